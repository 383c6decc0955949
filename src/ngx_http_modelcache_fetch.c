
/*
 * ngx_http_modelcache_fetch: the subrequest to modelcache_pass on a miss,
 * capture of its status, headers and body (header and body filters), its
 * post_subrequest handler and the parent's resumption.
 */


#include "ngx_http_modelcache.h"


static ngx_int_t ngx_http_modelcache_fetch_start(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_fetch_subrequest(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t flags,
    ngx_http_post_subrequest_pt handler);
static ngx_int_t ngx_http_modelcache_fetch_background_done(
    ngx_http_request_t *sr, void *data, ngx_int_t rc);
static ngx_int_t ngx_http_modelcache_fetch_member_done(ngx_http_request_t *sr,
    void *data, ngx_int_t rc);
static void ngx_http_modelcache_fetch_cleanup_handler(void *data);
static ngx_int_t ngx_http_modelcache_fetch_wait(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static void ngx_http_modelcache_fetch_wait_handler(ngx_event_t *ev);
static void ngx_http_modelcache_fetch_wake(ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_fetch_headers_in(ngx_http_request_t *sr);
static ngx_int_t ngx_http_modelcache_fetch_done(ngx_http_request_t *sr,
    void *data, ngx_int_t rc);
static void ngx_http_modelcache_fetch_resume(ngx_http_request_t *r);
static ngx_int_t ngx_http_modelcache_fetch_header_filter(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_modelcache_fetch_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_modelcache_fetch_append(ngx_http_request_t *r,
    ngx_http_modelcache_fetch_t *f, ngx_buf_t *b);
static ngx_int_t ngx_http_modelcache_fetch_reserve(ngx_http_request_t *r,
    ngx_http_modelcache_fetch_t *f, size_t n);
static ngx_int_t ngx_http_modelcache_fetch_copy_header(ngx_http_request_t *r,
    ngx_str_t *name, ngx_str_t *value);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;

/* this worker's requests waiting for a fetch, woken when one of ours ends */
static ngx_queue_t                       ngx_http_modelcache_waiters;


/* request headers the provider must not see: we want its whole 200 */
static ngx_str_t  ngx_http_modelcache_fetch_drop[] = {
    ngx_string("If-Modified-Since"),
    ngx_string("If-Unmodified-Since"),
    ngx_string("If-None-Match"),
    ngx_string("If-Match"),
    ngx_string("If-Range"),
    ngx_string("Range"),
    ngx_string("Accept-Encoding"),
    ngx_null_string
};


ngx_int_t
ngx_http_modelcache_fetch_init_filters(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_modelcache_fetch_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_modelcache_fetch_body_filter;

    return NGX_OK;
}


/*
 * A miss: fetch, or wait for the request that already does (single flight
 * across workers); NGX_DONE while the request is left pending.
 */

ngx_int_t
ngx_http_modelcache_fetch(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    switch (ngx_http_modelcache_zone_lock(ctx->zone, ctx, mlcf->lock_timeout,
                                          r->pool))
    {
    case NGX_HTTP_MODELCACHE_LOCK_HIT:
        if (!ctx->bypass) {
            ctx->status = NGX_HTTP_MODELCACHE_HIT;
        }

        return ngx_http_modelcache_handler_serve(r, ctx, ctx->node);

    case NGX_HTTP_MODELCACHE_LOCK_FAILED:
        return ngx_http_modelcache_handler_failure(r, ctx);

    case NGX_HTTP_MODELCACHE_LOCK_BUSY:

        if (!ctx->waited
            || (ngx_msec_int_t) (ctx->wait_until - ngx_current_msec) > 0)
        {
            return ngx_http_modelcache_fetch_wait(r, ctx);
        }

        /* fall through */

    case NGX_HTTP_MODELCACHE_LOCK_TAKEN:
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "modelcache: lock timeout or lost owner, fetching "
                      "for this request");
        break;

    default: /* OWNER, NONE */
        break;
    }

    return ngx_http_modelcache_fetch_start(r, ctx);
}


/*
 * Waiters in the owner's worker are woken when its fetch ends; the others
 * poll the zone, backing off from 1 ms to WAIT_MAX ms.
 */

static ngx_int_t
ngx_http_modelcache_fetch_wait(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_loc_conf_t  *mlcf;

    if (!ctx->waited) {
        mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

        ctx->waited = 1;
        ctx->wait_until = ngx_current_msec + mlcf->lock_timeout;
        ctx->wait_delay = 1;

        ctx->wait_event.handler = ngx_http_modelcache_fetch_wait_handler;
        ctx->wait_event.data = r;
        ctx->wait_event.log = r->connection->log;

        (void) ngx_atomic_fetch_add(&ctx->zone->sh->counters.lock_waits, 1);

    } else {
        ctx->wait_delay = ngx_min(ctx->wait_delay * 2,
                                  NGX_HTTP_MODELCACHE_WAIT_MAX);
    }

    if (ngx_http_modelcache_waiters.next == NULL) {
        ngx_queue_init(&ngx_http_modelcache_waiters);
    }

    ngx_queue_insert_tail(&ngx_http_modelcache_waiters, &ctx->wait_queue);
    ctx->waiting = 1;

    ngx_add_timer(&ctx->wait_event, ctx->wait_delay);

    /* paired with the NGX_DONE below; the wait handler finalizes */
    r->main->count++;

    return NGX_DONE;
}


static void
ngx_http_modelcache_fetch_wait_handler(ngx_event_t *ev)
{
    ngx_int_t                   rc;
    ngx_connection_t           *c;
    ngx_http_request_t         *r;
    ngx_http_modelcache_ctx_t  *ctx;

    r = ev->data;
    c = r->connection;
    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    ngx_http_set_log_request(c->log, r);

    ngx_queue_remove(&ctx->wait_queue);
    ctx->waiting = 0;

    rc = ngx_http_modelcache_fetch(r, ctx);

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/* the fetch this request owned is over: release the key, wake our waiters */

void
ngx_http_modelcache_fetch_release(ngx_http_modelcache_ctx_t *ctx,
    ngx_http_modelcache_failure_t *failure)
{
    if (!ctx->lock_owner) {
        return;
    }

    ngx_http_modelcache_zone_unlock(ctx->zone, ctx, failure);
    ngx_http_modelcache_fetch_wake(ctx);
}


static void
ngx_http_modelcache_fetch_wake(ngx_http_modelcache_ctx_t *ctx)
{
    ngx_queue_t                *q;
    ngx_http_modelcache_ctx_t  *w;

    if (ngx_http_modelcache_waiters.next == NULL) {
        return;
    }

    for (q = ngx_queue_head(&ngx_http_modelcache_waiters);
         q != ngx_queue_sentinel(&ngx_http_modelcache_waiters);
         q = ngx_queue_next(q))
    {
        w = ngx_queue_data(q, ngx_http_modelcache_ctx_t, wait_queue);

        if (w->zone != ctx->zone
            || ngx_memcmp(w->key, ctx->key, NGX_HTTP_MODELCACHE_KEY_LEN) != 0)
        {
            continue;
        }

        if (w->wait_event.timer_set) {
            ngx_del_timer(&w->wait_event);
        }

        ngx_post_event(&w->wait_event, &ngx_posted_events);
    }
}


/* the request is going away, whatever state it was in */

void
ngx_http_modelcache_fetch_cleanup(ngx_http_modelcache_ctx_t *ctx)
{
    if (ctx->waiting) {
        ngx_queue_remove(&ctx->wait_queue);
        ctx->waiting = 0;
    }

    if (ctx->wait_event.timer_set) {
        ngx_del_timer(&ctx->wait_event);
    }

    if (ctx->wait_event.posted) {
        ngx_delete_posted_event(&ctx->wait_event);
    }

    /* a fetch that will never be answered: let a waiter take over now */
    ngx_http_modelcache_fetch_release(ctx, NULL);
}


static ngx_int_t
ngx_http_modelcache_fetch_start(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_int_t  rc;
    ngx_str_t  msg;

    /*
     * A member of a merge is itself a background subrequest: its fetch is
     * one too, as a subrequest in its output chain would never be let
     * finish (that chain is not the client's); it wakes the member itself.
     */

    if (ctx->member) {
        rc = ngx_http_modelcache_fetch_subrequest(r, ctx,
                                         NGX_HTTP_SUBREQUEST_BACKGROUND,
                                         ngx_http_modelcache_fetch_member_done);

    } else {
        rc = ngx_http_modelcache_fetch_subrequest(r, ctx,
                                         NGX_HTTP_SUBREQUEST_WAITED,
                                         ngx_http_modelcache_fetch_done);
    }

    if (rc == NGX_DECLINED) {
        ngx_str_set(&msg, "modelcache_pass is not a safe local URI");
        return ngx_http_modelcache_send_json_error(r,
                                        NGX_HTTP_INTERNAL_SERVER_ERROR,
                                        "modelcache_config_error", &msg);
    }

    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    r->write_event_handler = ngx_http_modelcache_fetch_resume;

    /* paired with the NGX_DONE below; fetch_resume finalizes the request */
    r->main->count++;

    return NGX_DONE;
}


/*
 * Stale-while-revalidate: the request answers the stale entry and hands
 * the key's lock to a background subrequest of its own, which settles the
 * fetch (store, release, wake) when it ends.
 */

void
ngx_http_modelcache_fetch_background(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_pool_cleanup_t         *cln;
    ngx_http_modelcache_ctx_t  *bg;

    bg = ngx_pcalloc(r->pool, sizeof(ngx_http_modelcache_ctx_t));
    if (bg == NULL) {
        return;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return;
    }

    bg->zone = ctx->zone;
    ngx_memcpy(bg->key, ctx->key, NGX_HTTP_MODELCACHE_KEY_LEN);
    bg->pass = ctx->pass;
    bg->scope = ctx->scope;
    bg->status = ctx->status;
    bg->lock_gen = ctx->lock_gen;
    bg->lock_owner = 1;
    ctx->lock_owner = 0;

    /* released there if the refresh never settles */
    cln->handler = ngx_http_modelcache_fetch_cleanup_handler;
    cln->data = bg;

    if (ngx_http_modelcache_fetch_subrequest(r, bg,
                                    NGX_HTTP_SUBREQUEST_BACKGROUND,
                                    ngx_http_modelcache_fetch_background_done)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "modelcache: cannot start a background refresh");
        ngx_http_modelcache_fetch_release(bg, NULL);
        return;
    }

    /*
     * nginx keeps the connection until the refresh ends: the client's next
     * request on it would wait for the provider, so it goes on another one
     */
    r->main->keepalive = 0;
}


static ngx_int_t
ngx_http_modelcache_fetch_background_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc)
{
    ngx_http_modelcache_ctx_t  *bg = data;

    rc = ngx_http_modelcache_fetch_done(sr, data, rc);

    if (!bg->settled) {
        bg->settled = 1;
        (void) ngx_http_modelcache_handler_settle(sr->parent, bg);
    }

    return rc;
}


static ngx_int_t
ngx_http_modelcache_fetch_member_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc)
{
    ngx_http_modelcache_ctx_t  *ctx = data;

    if (!ctx->fetch.done) {
        (void) ngx_http_post_request(sr->parent, NULL);
    }

    return ngx_http_modelcache_fetch_done(sr, data, rc);
}


static void
ngx_http_modelcache_fetch_cleanup_handler(void *data)
{
    ngx_http_modelcache_fetch_cleanup(data);
}


/* NGX_DECLINED: the pass URI is not a safe local one */

static ngx_int_t
ngx_http_modelcache_fetch_subrequest(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t flags,
    ngx_http_post_subrequest_pt handler)
{
    ngx_str_t                    uri, args;
    ngx_uint_t                   uflags;
    ngx_http_request_t          *sr;
    ngx_http_post_subrequest_t  *ps;

    uri = ctx->pass;
    ngx_str_null(&args);
    uflags = NGX_HTTP_LOG_UNSAFE;

    if (uri.len == 0 || uri.data[0] != '/'
        || ngx_http_parse_unsafe_uri(r, &uri, &args, &uflags) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "modelcache_pass \"%V\" is not a safe local URI",
                      ngx_http_modelcache_log_escape(r->pool, &ctx->pass));
        return NGX_DECLINED;
    }

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = handler;
    ps->data = ctx;

    if (ngx_http_subrequest(r, &uri, &args, &sr, ps, flags) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->fetch.sr = sr;
    ctx->started = ngx_current_msec;

    /* the copy filter, above ours, then hands us memory, never files */
    sr->filter_need_in_memory = 1;

    ngx_http_set_ctx(sr, ctx, ngx_http_modelcache_module);

    if (ngx_http_modelcache_fetch_headers_in(sr) != NGX_OK) {
        return NGX_ERROR;
    }

    (void) ngx_atomic_fetch_add(&ctx->zone->sh->counters.upstream_fetches, 1);

    return NGX_OK;
}


/*
 * The subrequest shares the client's headers (so the provider sees its
 * credentials) but gets its own list without conditional, range and
 * encoding headers.
 */

static ngx_int_t
ngx_http_modelcache_fetch_headers_in(ngx_http_request_t *sr)
{
    ngx_str_t        *drop;
    ngx_uint_t        i;
    ngx_list_t        headers;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *nh;

    if (ngx_list_init(&headers, sr->pool, 20, sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    part = &sr->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        for (drop = ngx_http_modelcache_fetch_drop; drop->len; drop++) {
            if (h[i].key.len == drop->len
                && ngx_strncasecmp(h[i].key.data, drop->data, drop->len)
                   == 0)
            {
                break;
            }
        }

        if (drop->len) {
            continue;
        }

        nh = ngx_list_push(&headers);
        if (nh == NULL) {
            return NGX_ERROR;
        }

        *nh = h[i];
#if (nginx_version >= 1023000)
        nh->next = NULL;
#endif
    }

    sr->headers_in.headers = headers;

    sr->headers_in.if_modified_since = NULL;
    sr->headers_in.if_unmodified_since = NULL;
    sr->headers_in.if_none_match = NULL;
    sr->headers_in.if_match = NULL;
    sr->headers_in.if_range = NULL;
    sr->headers_in.range = NULL;

#if (NGX_HTTP_GZIP || NGX_HTTP_HEADERS)
    sr->headers_in.accept_encoding = NULL;
#endif

    return NGX_OK;
}


/* may run more than once for one subrequest: it only records */

static ngx_int_t
ngx_http_modelcache_fetch_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc)
{
    ngx_http_modelcache_ctx_t  *ctx = data;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, sr->connection->log, 0,
                   "modelcache fetch done: rc:%i status:%ui",
                   rc, ctx->fetch.status);

    if (ctx->fetch.rc == NGX_OK) {
        ctx->fetch.rc = rc;
    }

    ctx->fetch.done = 1;

    /* a provider failure is answered by the parent; only the client's kills */

    if (sr->connection->error
        || rc == NGX_HTTP_CLIENT_CLOSED_REQUEST
        || rc == NGX_HTTP_REQUEST_TIME_OUT)
    {
        return rc;
    }

    return NGX_OK;
}


static void
ngx_http_modelcache_fetch_resume(ngx_http_request_t *r)
{
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || !ctx->fetch.done) {
        return;
    }

    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_modelcache_handler_fetched(r, ctx);
}


static ngx_int_t
ngx_http_modelcache_fetch_header_filter(ngx_http_request_t *r)
{
    ngx_str_t                     name;
    ngx_http_modelcache_ctx_t    *ctx;
    ngx_http_modelcache_fetch_t  *f;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->fetch.sr != r) {
        return ngx_http_next_header_filter(r);
    }

    f = &ctx->fetch;

    f->header = 1;
    f->status = r->headers_out.status;
    f->content_length = r->headers_out.content_length_n;

    /* header values may live in a buffer the upstream reuses: copy them */

    if (r->headers_out.content_type.len) {
        f->content_type.len = r->headers_out.content_type.len;
        f->content_type.data = ngx_pstrdup(r->pool,
                                           &r->headers_out.content_type);
        if (f->content_type.data == NULL) {
            return NGX_ERROR;
        }
    }

    if (r->headers_out.content_encoding) {
        f->content_encoding.len = r->headers_out.content_encoding->value.len;
        f->content_encoding.data = ngx_pstrdup(r->pool,
                                    &r->headers_out.content_encoding->value);
        if (f->content_encoding.data == NULL) {
            return NGX_ERROR;
        }
    }

    ngx_str_set(&name, "WWW-Authenticate");
    if (ngx_http_modelcache_fetch_copy_header(r, &name, &f->www_authenticate)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_str_set(&name, "Retry-After");
    if (ngx_http_modelcache_fetch_copy_header(r, &name, &f->retry_after)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (f->content_length > 0
        && ngx_http_modelcache_fetch_reserve(r, f,
                  (size_t) ngx_min(f->content_length,
                                   (off_t) ctx->zone->max_entry + 1))
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_fetch_copy_header(ngx_http_request_t *r, ngx_str_t *name,
    ngx_str_t *value)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NGX_OK;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0
            || h[i].key.len != name->len
            || ngx_strncasecmp(h[i].key.data, name->data, name->len) != 0)
        {
            continue;
        }

        value->len = h[i].value.len;
        value->data = ngx_pstrdup(r->pool, &h[i].value);

        return value->data ? NGX_OK : NGX_ERROR;
    }
}


/* the subrequest's body stops here: collected, consumed, never sent on */

static ngx_int_t
ngx_http_modelcache_fetch_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t                  *cl;
    ngx_http_modelcache_ctx_t    *ctx;
    ngx_http_modelcache_fetch_t  *f;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->fetch.sr != r) {
        return ngx_http_next_body_filter(r, in);
    }

    f = &ctx->fetch;

    for (cl = in; cl; cl = cl->next) {

        if (ngx_http_modelcache_fetch_append(r, f, cl->buf) != NGX_OK) {
            return NGX_ERROR;
        }

        if (cl->buf->last_buf || cl->buf->last_in_chain) {
            f->last = 1;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_fetch_append(ngx_http_request_t *r,
    ngx_http_modelcache_fetch_t *f, ngx_buf_t *b)
{
    size_t   n;
    ssize_t  rc;

    if (ngx_buf_in_memory(b)) {
        n = b->last - b->pos;

        if (n) {
            if (ngx_http_modelcache_fetch_reserve(r, f, n) != NGX_OK) {
                return NGX_ERROR;
            }

            ngx_memcpy(f->body + f->len, b->pos, n);
            f->len += n;
        }

        b->pos = b->last;

        if (b->in_file) {
            b->file_pos = b->file_last;
        }

        return NGX_OK;
    }

    if (!b->in_file) {
        return NGX_OK;
    }

    /* not expected with filter_need_in_memory, kept correct all the same */

    n = (size_t) (b->file_last - b->file_pos);

    if (ngx_http_modelcache_fetch_reserve(r, f, n) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_read_file(b->file, f->body + f->len, n, b->file_pos);

    if (rc != (ssize_t) n) {
        return NGX_ERROR;
    }

    f->len += n;
    b->file_pos = b->file_last;

    return NGX_OK;
}


/* room for n more bytes, growing by doubling; one exact allocation when
 * the provider sent a Content-Length */

static ngx_int_t
ngx_http_modelcache_fetch_reserve(ngx_http_request_t *r,
    ngx_http_modelcache_fetch_t *f, size_t n)
{
    u_char  *p;
    size_t   size;

    if (f->size - f->len >= n) {
        return NGX_OK;
    }

    size = ngx_max(f->size * 2, f->len + n);
    size = ngx_max(size, 16384);

    p = ngx_palloc(r->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (f->len) {
        ngx_memcpy(p, f->body, f->len);
    }

    if (f->body) {
        ngx_pfree(r->pool, f->body);
    }

    f->body = p;
    f->size = size;

    return NGX_OK;
}
