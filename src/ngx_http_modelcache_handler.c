
/*
 * ngx_http_modelcache_handler: the content handler of a modelcache location
 * (lookup, fetch on a miss, what is stored and what is answered), response
 * headers, JSON errors and the $modelcache_* variables.
 */


#include "ngx_http_modelcache.h"


static ngx_int_t ngx_http_modelcache_handler_bypass(ngx_http_request_t *r,
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_uint_t *bypass);
static ngx_int_t ngx_http_modelcache_handler_revalidate(
    ngx_http_request_t *r, ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_settle_failed(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_settle_relay(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_settle_list(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_settle_error(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t status, ngx_str_t *reason);
static ngx_int_t ngx_http_modelcache_json_error_body(ngx_http_request_t *r,
    const char *type, ngx_str_t *message, ngx_str_t *body);
static ngx_int_t ngx_http_modelcache_handler_args(ngx_http_request_t *r,
    ngx_http_modelcache_filter_t *f, const char **param,
    const char **message);
static ngx_int_t ngx_http_modelcache_handler_arg(ngx_http_request_t *r,
    const char *name, ngx_str_t *value);
static ngx_int_t ngx_http_modelcache_send_answer(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a);
static ngx_int_t ngx_http_modelcache_send_stored(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a);
static ngx_int_t ngx_http_modelcache_send_gzip(ngx_http_request_t *r);
static void ngx_http_modelcache_handler_combine(
    ngx_http_modelcache_answer_t *a, ngx_uint_t n,
    ngx_http_modelcache_answer_t *out);
static ngx_int_t ngx_http_modelcache_derive_build(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_derive_t *d,
    ngx_http_modelcache_answer_t *out);
static ngx_int_t ngx_http_modelcache_send_not_found(ngx_http_request_t *r,
    ngx_str_t *id, const char *param);
static ngx_int_t ngx_http_modelcache_send_bad_arg(ngx_http_request_t *r,
    const char *param, const char *message);
static ngx_int_t ngx_http_modelcache_send_body(ngx_http_request_t *r,
    u_char *body, size_t len);
static ngx_int_t ngx_http_modelcache_add_status_header(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static void ngx_http_modelcache_count(ngx_http_modelcache_ctx_t *ctx);
static void ngx_http_modelcache_ctx_cleanup(void *data);

static ngx_int_t ngx_http_modelcache_variable_status(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_modelcache_variable_age(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_modelcache_variable_key(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


static ngx_str_t  ngx_http_modelcache_json_type =
    ngx_string("application/json");


static ngx_str_t  ngx_http_modelcache_status_names[] = {
    ngx_null_string,
    ngx_string("HIT"),
    ngx_string("MISS"),
    ngx_string("EXPIRED"),
    ngx_string("STALE"),
    ngx_string("UPDATING"),
    ngx_string("BYPASS"),
    ngx_string("ERROR")
};


static ngx_http_variable_t  ngx_http_modelcache_vars[] = {

    { ngx_string("modelcache_status"), NULL,
      ngx_http_modelcache_variable_status, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("modelcache_age"), NULL,
      ngx_http_modelcache_variable_age, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("modelcache_key"), NULL,
      ngx_http_modelcache_variable_key, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_modelcache_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_uint_t                       bypass;
    const char                      *param, *message;
    ngx_pool_cleanup_t              *cln;
    ngx_http_modelcache_ctx_t       *ctx;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_http_modelcache_send_not_allowed(r, "GET, HEAD");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx && ctx->member && !ctx->adopted && r != r->main) {
        /* a member of a merge: its ctx was made by the merging request */
        ctx->adopted = 1;

    } else {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_modelcache_ctx_t));
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->zone = mlcf->shm_zone->data;
    }

    /* whatever happens to the request: unpin, stop waiting, release */
    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_modelcache_ctx_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_modelcache_module);

    if (!ctx->member) {

        /* bad filter args are answered before anything is looked up */

        if (mlcf->filter) {
            rc = ngx_http_modelcache_handler_args(r, &ctx->filter, &param,
                                                  &message);
            if (rc == NGX_DECLINED) {
                return ngx_http_modelcache_send_bad_arg(r, param, message);
            }

            if (rc != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }

        if (mlcf->passes->nelts > 1) {
            return ngx_http_modelcache_aggregate(r, ctx);
        }
    }

    if (ngx_http_modelcache_key_build(r, mlcf, ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_modelcache_handler_bypass(r, mlcf, &bypass) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (bypass) {
        ctx->bypass = 1;
        ctx->arrived = ngx_current_msec;
        ctx->status = NGX_HTTP_MODELCACHE_BYPASS;
        return ngx_http_modelcache_fetch(r, ctx);
    }

    ctx->status = ngx_http_modelcache_zone_lookup(ctx->zone, ctx->key,
                                  ngx_max(mlcf->stale_while_revalidate,
                                          mlcf->stale_if_error),
                                  &ctx->node, &ctx->stale);

    if (ctx->status == NGX_HTTP_MODELCACHE_HIT) {
        return ngx_http_modelcache_handler_serve(r, ctx, ctx->node);
    }

    if (ctx->stale
        && ngx_time() < ctx->stale->expires + mlcf->stale_while_revalidate)
    {
        return ngx_http_modelcache_handler_revalidate(r, ctx);
    }

    return ngx_http_modelcache_fetch(r, ctx);
}


/* modelcache_bypass: any value neither empty nor "0" */

static ngx_int_t
ngx_http_modelcache_handler_bypass(ngx_http_request_t *r,
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_uint_t *bypass)
{
    ngx_str_t                  value;
    ngx_uint_t                 i;
    ngx_http_complex_value_t  *cv;

    *bypass = 0;

    if (mlcf->bypass == NULL) {
        return NGX_OK;
    }

    cv = mlcf->bypass->elts;

    for (i = 0; i < mlcf->bypass->nelts; i++) {
        if (ngx_http_complex_value(r, &cv[i], &value) != NGX_OK) {
            return NGX_ERROR;
        }

        if (value.len && !(value.len == 1 && value.data[0] == '0')) {
            *bypass = 1;
            return NGX_OK;
        }
    }

    return NGX_OK;
}


/*
 * Stale-while-revalidate: the expired entry is answered at once; the
 * request that gets the key's lock starts the one background refresh
 * (STALE), those that find it running are UPDATING.
 */

static ngx_int_t
ngx_http_modelcache_handler_revalidate(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    switch (ngx_http_modelcache_zone_lock(ctx->zone, ctx, mlcf->lock_timeout,
                                          r->pool))
    {
    case NGX_HTTP_MODELCACHE_LOCK_HIT:
        ctx->status = NGX_HTTP_MODELCACHE_HIT;
        return ngx_http_modelcache_handler_serve(r, ctx, ctx->node);

    case NGX_HTTP_MODELCACHE_LOCK_OWNER:
    case NGX_HTTP_MODELCACHE_LOCK_TAKEN:
        ctx->status = NGX_HTTP_MODELCACHE_STALE;
        ngx_http_modelcache_fetch_background(r, ctx);
        break;

    case NGX_HTTP_MODELCACHE_LOCK_BUSY:
        ctx->status = NGX_HTTP_MODELCACHE_UPDATING;
        break;

    default: /* NONE: no room even for a lock; nobody refreshes now */
        ctx->status = NGX_HTTP_MODELCACHE_STALE;
        break;
    }

    return ngx_http_modelcache_handler_serve(r, ctx, ctx->stale);
}


/* a stored entry, fresh or stale, pinned until the request's pool goes */

ngx_int_t
ngx_http_modelcache_handler_serve(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_node_t *node)
{
    time_t                         now;
    ngx_http_modelcache_answer_t   a;

    ngx_http_modelcache_count(ctx);

    now = ngx_time();

    a.body = node->body;
    a.len = node->body_len;
    a.etag = node->etag;
    a.fetched = node->fetched;
    a.age = now - node->fetched;
    a.max_age = node->expires - now;
    a.gz = node->gz;
    a.gz_len = node->gz_len;
    a.gz_etag = node->gz_etag;
    a.node = node;
    ngx_str_null(&a.label);

    return ngx_http_modelcache_send_answer(r, ctx, &a);
}


/* the fetch subrequest is over: settle, answer, finalize */

void
ngx_http_modelcache_handler_fetched(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_int_t                         rc;
    ngx_http_modelcache_answer_t      a;
    ngx_http_modelcache_loc_conf_t   *mlcf;

    rc = ngx_http_modelcache_handler_settle(r, ctx);

    if (rc == NGX_DECLINED) {
        rc = ngx_http_modelcache_handler_failure(r, ctx);

    } else if (rc == NGX_OK) {
        mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

        ngx_http_modelcache_count(ctx);

        a.body = ctx->fetch.body;
        a.len = ctx->fetch.len;
        a.etag = ctx->etag;
        a.fetched = ngx_time();
        a.age = 0;
        a.max_age = mlcf->ttl;
        a.gz = ctx->gz.data;
        a.gz_len = ctx->gz.len;
        a.gz_etag = ctx->gz_etag;
        a.node = NULL;
        ngx_str_null(&a.label);

        rc = ngx_http_modelcache_send_answer(r, ctx, &a);

    } else {
        rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * What a fetch brought, decided once, for a client or for a background
 * refresh: NGX_OK, a model list (stored if it fits, ctx->etag set);
 * NGX_DECLINED, a failure in ctx->failure.  Either way the key's lock is
 * released, waking the requests that waited for this fetch.
 */

ngx_int_t
ngx_http_modelcache_handler_settle(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_int_t                     rc;
    ngx_http_modelcache_fetch_t  *f;

    f = &ctx->fetch;

    if (!f->header
        || f->rc == NGX_ERROR
        || f->rc >= NGX_HTTP_SPECIAL_RESPONSE
        || !f->last
        || (f->content_length >= 0 && (off_t) f->len != f->content_length))
    {
        rc = ngx_http_modelcache_settle_failed(r, ctx);

    } else if (f->status != NGX_HTTP_OK) {
        rc = ngx_http_modelcache_settle_relay(r, ctx);

    } else {
        rc = ngx_http_modelcache_settle_list(r, ctx);
    }

    if (rc == NGX_ERROR) {
        /* no answer to hand over: the waiters fetch for themselves */
        ctx->failure.status = 0;
        ngx_http_modelcache_fetch_release(ctx, &ctx->failure);
    }

    return rc;
}


/* no complete answer from the provider */

static ngx_int_t
ngx_http_modelcache_settle_failed(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_str_t                     reason;
    ngx_uint_t                    status;
    ngx_http_modelcache_fetch_t  *f;

    f = &ctx->fetch;
    status = NGX_HTTP_BAD_GATEWAY;

    if (f->header) {
        ngx_str_set(&reason, "provider connection failed during the answer");

    } else if (f->rc == NGX_HTTP_GATEWAY_TIME_OUT) {
        status = NGX_HTTP_GATEWAY_TIME_OUT;
        ngx_str_set(&reason, "provider timed out");

    } else if (f->rc == NGX_HTTP_BAD_GATEWAY || f->rc == NGX_ERROR) {
        ngx_str_set(&reason, "provider could not be reached");

    } else {
        /* the internal location itself refused, e.g. 404 or 403 */
        if (f->rc >= NGX_HTTP_BAD_REQUEST && f->rc < 600) {
            status = f->rc;
        }

        ngx_str_set(&reason, "modelcache_pass location gave no answer");
    }

    return ngx_http_modelcache_settle_error(r, ctx, status, &reason);
}


/* the provider's non-200 answer is relayed unchanged, never stored */

static ngx_int_t
ngx_http_modelcache_settle_relay(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_fetch_t  *f;

    f = &ctx->fetch;

    if (f->status == NGX_HTTP_UNAUTHORIZED
        || f->status == NGX_HTTP_FORBIDDEN)
    {
        /* the credentials no longer hold: what they fetched must go */
        ngx_http_modelcache_zone_delete(ctx->zone, ctx->key);
    }

    ctx->failure.status = f->status;
    ctx->failure.content_type = f->content_type;
    ctx->failure.body.data = f->body;
    ctx->failure.body.len = f->len;

    ngx_http_modelcache_fetch_release(ctx, &ctx->failure);

    return NGX_DECLINED;
}


/* a 200: a model list is stored if it fits */

static ngx_int_t
ngx_http_modelcache_settle_list(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_int_t                        rc;
    ngx_str_t                        reason;
    ngx_http_modelcache_fetch_t     *f;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    f = &ctx->fetch;
    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    if (f->content_encoding.len
        && !(f->content_encoding.len == 8
             && ngx_strncasecmp(f->content_encoding.data,
                                (u_char *) "identity", 8) == 0))
    {
        ngx_str_set(&reason, "provider answered with a Content-Encoding; "
                             "set proxy_set_header Accept-Encoding \"\"");
        return ngx_http_modelcache_settle_error(r, ctx, NGX_HTTP_BAD_GATEWAY,
                                                &reason);
    }

    rc = ngx_http_modelcache_json_validate(f->body, f->len, &mlcf->list_field,
                                           &reason, r->pool);

    if (rc != NGX_OK) {
        return rc == NGX_DECLINED
               ? ngx_http_modelcache_settle_error(r, ctx,
                                                  NGX_HTTP_BAD_GATEWAY,
                                                  &reason)
               : NGX_ERROR;
    }

    if (ngx_http_modelcache_key_etag(f->body, f->len, ctx->etag) != NGX_OK) {
        return NGX_ERROR;
    }

    if (f->len <= ctx->zone->max_entry
        && ngx_http_modelcache_gzip(r->pool, f->body, f->len, &ctx->gz,
                                    ctx->gz_etag)
           == NGX_ERROR)
    {
        /* served and stored all the same, without a gzip copy */
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "modelcache: cannot make the gzip copy of a list");
    }

    if (f->len > ctx->zone->max_entry) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "modelcache: provider answer of %uz bytes exceeds "
                      "max_entry=%uz of zone \"%V\", not stored",
                      f->len, ctx->zone->max_entry,
                      &ctx->zone->shm_zone->shm.name);
        rc = NGX_DECLINED;

    } else {
        rc = ngx_http_modelcache_zone_store(ctx->zone, ctx, mlcf->ttl,
                                            ctx->etag, r->connection->log);
    }

    /* not stored: no answer to hand over, the waiters fetch for themselves */
    ctx->failure.status = 0;
    ngx_http_modelcache_fetch_release(ctx,
                                      rc == NGX_OK ? NULL : &ctx->failure);

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_settle_error(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t status, ngx_str_t *reason)
{
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "modelcache: %V, nothing stored",
                  ngx_http_modelcache_log_escape(r->pool, reason));

    ctx->failure.status = status;
    ngx_str_set(&ctx->failure.content_type, "application/json");

    if (ngx_http_modelcache_json_error_body(r, "modelcache_upstream_error",
                                            reason, &ctx->failure.body)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_modelcache_fetch_release(ctx, &ctx->failure);

    return NGX_DECLINED;
}


/*
 * ctx->failure, the owner's or the one a waiter was handed, answered as
 * it is, or with the stale entry when stale-if-error allows
 */

ngx_int_t
ngx_http_modelcache_handler_failure(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_fetch_t     *f;
    ngx_http_modelcache_failure_t   *fl;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    fl = &ctx->failure;
    f = &ctx->fetch;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    if (ctx->stale
        && (fl->status >= NGX_HTTP_INTERNAL_SERVER_ERROR
            || fl->status == NGX_HTTP_TOO_MANY_REQUESTS)
        && ngx_time() < ctx->stale->expires + mlcf->stale_if_error)
    {
        ctx->status = NGX_HTTP_MODELCACHE_STALE;
        return ngx_http_modelcache_handler_serve(r, ctx, ctx->stale);
    }

    ctx->status = NGX_HTTP_MODELCACHE_ERROR;
    ngx_http_modelcache_count(ctx);

    /* the provider's own, when this request relays what it fetched */
    if (f->header && f->status == fl->status
        && ((f->www_authenticate.len
             && ngx_http_modelcache_add_header(r, "WWW-Authenticate",
                                               &f->www_authenticate, NULL)
                != NGX_OK)
            || (f->retry_after.len
                && ngx_http_modelcache_add_header(r, "Retry-After",
                                                  &f->retry_after, NULL)
                   != NGX_OK)))
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_modelcache_send(r, fl->status, &fl->content_type,
                                    &fl->body);
}


/*
 * A list to answer, fresh, stale or just fetched: as it is stored, or what
 * the location derives from it; a member of a merge hands it over.
 */

static ngx_int_t
ngx_http_modelcache_send_answer(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a)
{
    ngx_http_modelcache_loc_conf_t  *mlcf;

    ctx->age = a->age;
    a->key = ctx->key;

    if (ctx->member) {
        ngx_http_modelcache_aggregate_record(ctx, NGX_HTTP_OK, NULL, NULL, a);
        return NGX_OK;
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    if (mlcf->labelled) {
        /* one labelled pass: a merge of one */
        a->label = ((ngx_http_modelcache_pass_t *) mlcf->passes->elts)
                   ->provider;
    }

    if (mlcf->lookup || mlcf->hide || mlcf->show || mlcf->labelled
        || ctx->filter.set)
    {
        return ngx_http_modelcache_handler_derive(r, ctx, a, 1);
    }

    return ngx_http_modelcache_send_stored(r, ctx, a);
}


/*
 * The answer of a lookup, filter, hide/show or merge over n lists: a
 * stored one if the zone has it, else made now, in request memory, and
 * stored as a child of the (first) list entry it came from.
 */

ngx_int_t
ngx_http_modelcache_handler_derive(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a,
    ngx_uint_t n)
{
    ngx_int_t                        rc;
    ngx_str_t                        value;
    ngx_http_modelcache_answer_t     out;
    ngx_http_modelcache_derive_t     d;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    ngx_memzero(&d, sizeof(ngx_http_modelcache_derive_t));

    d.sources = a;
    d.nsources = n;
    d.mlcf = mlcf;
    d.filter = ctx->filter.set ? &ctx->filter : NULL;

    if (mlcf->lookup) {
        if (ngx_http_complex_value(r, mlcf->lookup, &value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        d.lookup = &value;
    }

    ngx_http_modelcache_handler_combine(a, n, &out);
    ctx->age = out.age;

    rc = ngx_http_modelcache_derive_build(r, ctx, &d, &out);

    if (rc == NGX_DECLINED) {
        return ngx_http_modelcache_send_not_found(r,
                                     d.lookup ? d.lookup : &d.filter->after,
                                     d.param);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_modelcache_send_stored(r, ctx, &out);
}


static ngx_int_t
ngx_http_modelcache_derive_build(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_derive_t *d,
    ngx_http_modelcache_answer_t *out)
{
    u_char                          *etag;
    u_char                           key[NGX_HTTP_MODELCACHE_KEY_LEN];
    ngx_int_t                        rc;
    ngx_uint_t                       i;
    ngx_http_modelcache_node_t      *node;
    ngx_http_modelcache_counters_t  *c;

    c = &ctx->zone->sh->counters;

    if (ngx_http_modelcache_key_derived(r, d, key) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->member == 0 && d->nsources > 1) {
        /* a merge's $modelcache_key: what its answer is made of */
        ngx_memcpy(ctx->key, key, NGX_HTTP_MODELCACHE_KEY_LEN);
    }

    node = ngx_http_modelcache_zone_derived_lookup(ctx->zone, key);

    if (node) {
        ctx->derived = node;
        out->body = node->body;
        out->len = node->body_len;
        out->etag = node->etag;
        out->gz_len = 0;

        (void) ngx_atomic_fetch_add(&c->derived_hits, 1);

        return NGX_OK;
    }

    rc = ngx_http_modelcache_json_derive(d, r->pool);

    if (rc != NGX_OK) {
        if (rc == NGX_ERROR) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "modelcache: cannot derive an answer from the "
                          "stored list");
        }

        return rc;
    }

    etag = ngx_pnalloc(r->pool, NGX_HTTP_MODELCACHE_ETAG_LEN);
    if (etag == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_modelcache_key_etag(d->out.data, d->out.len, etag)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    (void) ngx_atomic_fetch_add(&c->derived_builds, 1);

    out->body = d->out.data;
    out->len = d->out.len;
    out->etag = etag;
    out->gz_len = 0;

    /*
     * kept with a stored list it came from (a list fetched now is not one):
     * the largest, whose budget a merge fits best
     */

    node = NULL;

    for (i = 0; i < d->nsources; i++) {
        if (d->sources[i].node
            && (node == NULL || d->sources[i].node->body_len > node->body_len))
        {
            node = d->sources[i].node;
        }
    }

    if (node) {
        ngx_http_modelcache_zone_derived_store(ctx->zone, node, key, &d->out,
                                               etag);
    }

    return NGX_OK;
}


/* what n answers merged say: the oldest age, the soonest expiry */

static void
ngx_http_modelcache_handler_combine(ngx_http_modelcache_answer_t *a,
    ngx_uint_t n, ngx_http_modelcache_answer_t *out)
{
    ngx_uint_t  i;

    *out = a[0];

    for (i = 1; i < n; i++) {
        out->age = ngx_max(out->age, a[i].age);
        out->max_age = ngx_min(out->max_age, a[i].max_age);
        out->fetched = ngx_max(out->fetched, a[i].fetched);
    }
}


static ngx_int_t
ngx_http_modelcache_send_stored(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a)
{
    u_char     *p, *body, *etag;
    size_t      len;
    ngx_int_t   rc;
    ngx_str_t   value;

    /* for nginx's not-modified filter too: If-Unmodified-Since needs it */
    r->headers_out.last_modified_time = a->fetched;

    body = a->body;
    len = a->len;
    etag = a->etag;

    if (a->gz_len) {
        rc = ngx_http_modelcache_send_gzip(r);

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (rc == NGX_OK) {
            body = a->gz;
            len = a->gz_len;
            etag = a->gz_etag;
        }
    }

    value.data = etag;
    value.len = NGX_HTTP_MODELCACHE_ETAG_LEN;

    if (ngx_http_modelcache_add_header(r, "ETag", &value,
                                       &r->headers_out.etag)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_pnalloc(r->pool, sizeof("private, max-age=") - 1 + NGX_TIME_T_LEN
                             + NGX_TIME_T_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    value.data = p;
    value.len = ngx_sprintf(p, "private, max-age=%T",
                            ngx_max(a->max_age, 0))
                - p;
    p += value.len;

    if (ngx_http_modelcache_add_header(r, "Cache-Control", &value, NULL)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    value.data = p;
    value.len = ngx_sprintf(p, "%T", ngx_max(a->age, 0)) - p;

    if (ngx_http_modelcache_add_header(r, "Age", &value, NULL) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    value.data = body;
    value.len = len;

    return ngx_http_modelcache_send(r, NGX_HTTP_OK,
                                    &ngx_http_modelcache_json_type, &value);
}


/*
 * A list with a gzip copy varies by Accept-Encoding; the copy answers a
 * client that accepts it, as gzip_static would (gzip_http_version,
 * gzip_proxied and gzip_disable apply).  NGX_OK: Content-Encoding is set.
 */

static ngx_int_t
ngx_http_modelcache_send_gzip(ngx_http_request_t *r)
{
    ngx_str_t  value;

    ngx_str_set(&value, "Accept-Encoding");

    if (ngx_http_modelcache_add_header(r, "Vary", &value, NULL) != NGX_OK) {
        return NGX_ERROR;
    }

#if (NGX_HTTP_GZIP)

    if (ngx_http_gzip_ok(r) != NGX_OK) {
        return NGX_DECLINED;
    }

    ngx_str_set(&value, "gzip");

    if (ngx_http_modelcache_add_header(r, "Content-Encoding", &value,
                                       &r->headers_out.content_encoding)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;

#else

    return NGX_DECLINED;

#endif
}


/*
 * The shape OpenAI's API answers, which its SDKs understand: a model that
 * is not there (param "model"), or a filter that leaves none.
 */

static ngx_int_t
ngx_http_modelcache_send_not_found(ngx_http_request_t *r, ngx_str_t *id,
    const char *param)
{
    u_char     *p;
    size_t      len;
    ngx_str_t   body;

    len = sizeof("{\"error\":{\"message\":\"The model '' does not exist or "
                 "you do not have access to it.\",\"type\":"
                 "\"invalid_request_error\",\"param\":\"\","
                 "\"code\":\"model_not_found\"}}\\n") - 1
          + id->len + ngx_escape_json(NULL, id->data, id->len)
          + ngx_strlen(param);

    body.data = ngx_pnalloc(r->pool, len);
    if (body.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = body.data;

    if (ngx_strcmp(param, "model") == 0) {
        p = ngx_cpymem(p, "{\"error\":{\"message\":\"The model '",
                       sizeof("{\"error\":{\"message\":\"The model '") - 1);
        p = (u_char *) ngx_escape_json(p, id->data, id->len);
        p = ngx_cpymem(p, "' does not exist or you do not have access to "
                       "it.\"", sizeof("' does not exist or you do not have "
                                       "access to it.\"") - 1);

    } else {
        p = ngx_cpymem(p, "{\"error\":{\"message\":\"No model matches the "
                       "filter.\"", sizeof("{\"error\":{\"message\":\"No "
                                           "model matches the filter.\"")
                                    - 1);
    }

    p = ngx_sprintf(p, ",\"type\":\"invalid_request_error\",\"param\":\"%s\","
                    "\"code\":\"model_not_found\"}}\n", param);
    body.len = p - body.data;

    return ngx_http_modelcache_send(r, NGX_HTTP_NOT_FOUND,
                                    &ngx_http_modelcache_json_type, &body);
}


/* 400, in the same shape */

static ngx_int_t
ngx_http_modelcache_send_bad_arg(ngx_http_request_t *r, const char *param,
    const char *message)
{
    u_char     *p;
    size_t      len;
    ngx_str_t   body;

    len = sizeof("{\"error\":{\"message\":\"\",\"type\":"
                 "\"invalid_request_error\",\"param\":\"\","
                 "\"code\":\"invalid_filter\"}}\n")
          + ngx_strlen(message) + ngx_strlen(param);

    body.data = ngx_pnalloc(r->pool, len);
    if (body.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(body.data, "{\"error\":{\"message\":\"%s\",\"type\":"
                    "\"invalid_request_error\",\"param\":\"%s\","
                    "\"code\":\"invalid_filter\"}}\n", message, param);
    body.len = p - body.data;

    return ngx_http_modelcache_send(r, NGX_HTTP_BAD_REQUEST,
                                    &ngx_http_modelcache_json_type, &body);
}


/*
 * modelcache_filter: q, owned_by, sort, limit, after; percent-decoded,
 * checked.  NGX_DECLINED: a bad one, *param and *message say which, why.
 */

static ngx_int_t
ngx_http_modelcache_handler_args(ngx_http_request_t *r,
    ngx_http_modelcache_filter_t *f, const char **param, const char **message)
{
    ngx_int_t  n;
    ngx_str_t  v;

    if (ngx_http_modelcache_handler_arg(r, "q", &f->q) != NGX_OK
        || ngx_http_modelcache_handler_arg(r, "owned_by", &f->owned_by)
           != NGX_OK
        || ngx_http_modelcache_handler_arg(r, "after", &f->after) != NGX_OK
        || ngx_http_modelcache_handler_arg(r, "sort", &v) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (v.len) {
        if (v.len == 2 && ngx_strncmp(v.data, "id", 2) == 0) {
            f->sort = NGX_HTTP_MODELCACHE_SORT_ID;

        } else if (v.len == 3 && ngx_strncmp(v.data, "-id", 3) == 0) {
            f->sort = -NGX_HTTP_MODELCACHE_SORT_ID;

        } else if (v.len == 7 && ngx_strncmp(v.data, "created", 7) == 0) {
            f->sort = NGX_HTTP_MODELCACHE_SORT_CREATED;

        } else if (v.len == 8 && ngx_strncmp(v.data, "-created", 8) == 0) {
            f->sort = -NGX_HTTP_MODELCACHE_SORT_CREATED;

        } else {
            *param = "sort";
            *message = "sort must be one of id, -id, created, -created";
            return NGX_DECLINED;
        }
    }

    if (ngx_http_modelcache_handler_arg(r, "limit", &v) != NGX_OK) {
        return NGX_ERROR;
    }

    if (v.len) {
        n = (v.len <= 6) ? ngx_atoi(v.data, v.len) : NGX_ERROR;

        if (n < 1 || n > NGX_HTTP_MODELCACHE_LIMIT_MAX) {
            *param = "limit";
            *message = "limit must be a whole number from 1 to 100000";
            return NGX_DECLINED;
        }

        f->limit = n;
    }

    f->set = (f->q.len || f->owned_by.len || f->after.len || f->sort
              || f->limit);

    return NGX_OK;
}


/* an arg's value, percent-decoded ('+' stays); empty when absent */

static ngx_int_t
ngx_http_modelcache_handler_arg(ngx_http_request_t *r, const char *name,
    ngx_str_t *value)
{
    u_char     *dst, *src;
    ngx_str_t   raw;

    ngx_str_null(value);

    if (ngx_http_arg(r, (u_char *) name, ngx_strlen(name), &raw) != NGX_OK
        || raw.len == 0)
    {
        return NGX_OK;
    }

    value->data = ngx_pnalloc(r->pool, raw.len);
    if (value->data == NULL) {
        return NGX_ERROR;
    }

    dst = value->data;
    src = raw.data;
    ngx_unescape_uri(&dst, &src, raw.len, 0);
    value->len = dst - value->data;

    return NGX_OK;
}


/* the body is not copied: it stays where it is (pinned shm or our pool) */

static ngx_int_t
ngx_http_modelcache_send_body(ngx_http_request_t *r, u_char *body,
    size_t len)
{
    ngx_buf_t    *b;
    ngx_chain_t   out;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body;
    b->last = body + len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_modelcache_send_json_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, ngx_str_t *message)
{
    ngx_str_t  body;

    if (ngx_http_modelcache_json_error_body(r, type, message, &body)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_modelcache_send(r, status,
                                    &ngx_http_modelcache_json_type, &body);
}


/*
 * Every answer of the module ends here: status, type and body as given,
 * X-Modelcache-Status where the request has a cache status.
 */

ngx_int_t
ngx_http_modelcache_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, ngx_str_t *body)
{
    ngx_int_t                   rc;
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx && ctx->member) {
        /* a member of a merge answers the merging request, not a client */
        ngx_http_modelcache_aggregate_record(ctx, status, type, body, NULL);
        return NGX_OK;
    }

    r->headers_out.status = status;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = body->len;

    if (ctx && ngx_http_modelcache_add_status_header(r, ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    if (body->len == 0) {
        return ngx_http_send_special(r, NGX_HTTP_LAST);
    }

    return ngx_http_modelcache_send_body(r, body->data, body->len);
}


/* {"error":{"type":"TYPE","message":"MESSAGE"}}, the message escaped */

static ngx_int_t
ngx_http_modelcache_json_error_body(ngx_http_request_t *r, const char *type,
    ngx_str_t *message, ngx_str_t *body)
{
    u_char  *p;
    size_t   len, tlen;

    tlen = ngx_strlen(type);
    len = sizeof("{\"error\":{\"type\":\"\",\"message\":\"\"}}\n") - 1
          + tlen + message->len
          + ngx_escape_json(NULL, message->data, message->len);

    body->data = ngx_pnalloc(r->pool, len);
    if (body->data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(body->data, "{\"error\":{\"type\":\"",
                   sizeof("{\"error\":{\"type\":\"") - 1);
    p = ngx_cpymem(p, type, tlen);
    p = ngx_cpymem(p, "\",\"message\":\"", sizeof("\",\"message\":\"") - 1);
    p = (u_char *) ngx_escape_json(p, message->data, message->len);
    p = ngx_cpymem(p, "\"}}\n", sizeof("\"}}\n") - 1);

    body->len = p - body->data;

    return NGX_OK;
}


ngx_int_t
ngx_http_modelcache_send_not_allowed(ngx_http_request_t *r, char *allow)
{
    ngx_str_t  value, msg;

    value.data = (u_char *) allow;
    value.len = ngx_strlen(allow);

    if (ngx_http_modelcache_add_header(r, "Allow", &value, NULL) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    (void) ngx_http_discard_request_body(r);

    ngx_str_set(&msg, "method not allowed");

    return ngx_http_modelcache_send_json_error(r, NGX_HTTP_NOT_ALLOWED,
                                               "modelcache_method_not_allowed",
                                               &msg);
}


/*
 * Client and provider bytes (purge filters, evaluated pass URIs, parser
 * messages quoting a body) go into log lines escaped as JSON strings are,
 * so that none can end a line or forge another.
 */

ngx_str_t *
ngx_http_modelcache_log_escape(ngx_pool_t *pool, ngx_str_t *src)
{
    size_t            n;
    ngx_str_t        *dst;
    static ngx_str_t  unloggable = ngx_string("(not logged: out of memory)");

    n = ngx_escape_json(NULL, src->data, src->len);

    if (n == 0) {
        return src;
    }

    dst = ngx_palloc(pool, sizeof(ngx_str_t));
    if (dst == NULL) {
        return &unloggable;
    }

    dst->data = ngx_pnalloc(pool, src->len + n);
    if (dst->data == NULL) {
        return &unloggable;
    }

    dst->len = (u_char *) ngx_escape_json(dst->data, src->data, src->len)
               - dst->data;

    return dst;
}


ngx_int_t
ngx_http_modelcache_add_header(ngx_http_request_t *r, const char *name,
    ngx_str_t *value, ngx_table_elt_t **hp)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value = *value;

    if (hp) {
        *hp = h;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_add_status_header(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    if (!mlcf->status_header || ctx->status == NGX_HTTP_MODELCACHE_NONE) {
        return NGX_OK;
    }

    return ngx_http_modelcache_add_header(r, "X-Modelcache-Status",
                                   &ngx_http_modelcache_status_names[ctx->status],
                                   NULL);
}


/* each request is counted once, by the status it was answered with */

static void
ngx_http_modelcache_count(ngx_http_modelcache_ctx_t *ctx)
{
    ngx_atomic_t                    *counter;
    ngx_http_modelcache_counters_t  *c;

    c = &ctx->zone->sh->counters;

    switch (ctx->status) {

    case NGX_HTTP_MODELCACHE_HIT:
        counter = &c->hits;
        break;

    case NGX_HTTP_MODELCACHE_MISS:
        counter = &c->misses;
        break;

    case NGX_HTTP_MODELCACHE_EXPIRED:
        counter = &c->expired;
        break;

    case NGX_HTTP_MODELCACHE_STALE:
        counter = &c->stale;
        break;

    case NGX_HTTP_MODELCACHE_UPDATING:
        counter = &c->updating;
        break;

    case NGX_HTTP_MODELCACHE_BYPASS:
        counter = &c->bypass;
        break;

    case NGX_HTTP_MODELCACHE_ERROR:
        counter = &c->errors;
        break;

    default:
        return;
    }

    (void) ngx_atomic_fetch_add(counter, 1);
}


static void
ngx_http_modelcache_ctx_cleanup(void *data)
{
    ngx_http_modelcache_ctx_t  *ctx = data;

    if (ctx->node) {
        ngx_http_modelcache_zone_unpin(ctx->zone, ctx->node);
        ctx->node = NULL;
    }

    if (ctx->stale) {
        ngx_http_modelcache_zone_unpin(ctx->zone, ctx->stale);
        ctx->stale = NULL;
    }

    if (ctx->derived) {
        ngx_http_modelcache_zone_unpin(ctx->zone, ctx->derived);
        ctx->derived = NULL;
    }

    ngx_http_modelcache_fetch_cleanup(ctx);
}


ngx_int_t
ngx_http_modelcache_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_modelcache_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_variable_status(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->status == NGX_HTTP_MODELCACHE_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = ngx_http_modelcache_status_names[ctx->status].len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = ngx_http_modelcache_status_names[ctx->status].data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_variable_age(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                     *p;
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->status == NGX_HTTP_MODELCACHE_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%T", ctx->age) - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_variable_key(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                     *p;
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->status == NGX_HTTP_MODELCACHE_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, NGX_HTTP_MODELCACHE_KEY_HEX_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_hex_dump(p, ctx->key, NGX_HTTP_MODELCACHE_KEY_LEN) - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}
