
/*
 * ngx_http_modelcache_aggregate: a location with several modelcache_pass
 * lines.  Each provider is a member: a background subrequest to the same
 * location that runs the whole cache for its own pass (entry, lock, fetch,
 * stale) and hands its list or its failure back; the merged answer follows.
 */


#include "ngx_http_modelcache.h"


static ngx_int_t ngx_http_modelcache_aggregate_member(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t i);
static ngx_int_t ngx_http_modelcache_aggregate_done(ngx_http_request_t *sr,
    void *data, ngx_int_t rc);
static void ngx_http_modelcache_aggregate_resume(ngx_http_request_t *r);
static ngx_int_t ngx_http_modelcache_aggregate_answer(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
static ngx_int_t ngx_http_modelcache_aggregate_failed(ngx_http_request_t *r,
    ngx_http_modelcache_agg_t *agg);
static ngx_int_t ngx_http_modelcache_aggregate_partial(ngx_http_request_t *r,
    ngx_http_modelcache_agg_t *agg);


/* NGX_DONE: the members run; the request is answered when all are done */

ngx_int_t
ngx_http_modelcache_aggregate(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_uint_t                       i;
    ngx_http_modelcache_agg_t       *agg;
    ngx_http_modelcache_pass_t      *pass;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);

    agg = ngx_pcalloc(r->pool, sizeof(ngx_http_modelcache_agg_t));
    if (agg == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    agg->r = r;
    agg->n = mlcf->passes->nelts;

    agg->members = ngx_pcalloc(r->pool,
                               agg->n * sizeof(ngx_http_modelcache_member_t));
    if (agg->members == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->agg = agg;
    pass = mlcf->passes->elts;

    for (i = 0; i < agg->n; i++) {
        agg->members[i].label = pass[i].provider;

        if (ngx_http_modelcache_aggregate_member(r, ctx, i) != NGX_OK) {
            /* those started end on their own; nobody waits for them */
            agg->r = NULL;
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        agg->pending++;
    }

    r->write_event_handler = ngx_http_modelcache_aggregate_resume;

    /* paired with the NGX_DONE below; aggregate_resume finalizes */
    r->main->count++;

    return NGX_DONE;
}


/*
 * A background subrequest to this very location: it is not in the
 * client's output chain, so the members end in any order, and sends
 * nothing (header_only); its ctx tells the handler which pass is its own.
 */

static ngx_int_t
ngx_http_modelcache_aggregate_member(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_uint_t i)
{
    ngx_http_request_t            *sr;
    ngx_http_modelcache_ctx_t     *mctx;
    ngx_http_post_subrequest_t    *ps;
    ngx_http_modelcache_member_t  *m;

    m = &ctx->agg->members[i];

    mctx = ngx_pcalloc(r->pool, sizeof(ngx_http_modelcache_ctx_t));
    if (mctx == NULL) {
        return NGX_ERROR;
    }

    mctx->zone = ctx->zone;
    mctx->agg = ctx->agg;
    mctx->member = i + 1;
    m->ctx = mctx;

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = ngx_http_modelcache_aggregate_done;
    ps->data = m;

    if (ngx_http_subrequest(r, &r->uri, &r->args, &sr, ps,
                            NGX_HTTP_SUBREQUEST_BACKGROUND)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    sr->header_only = 1;

    ngx_http_set_ctx(sr, mctx, ngx_http_modelcache_module);

    return NGX_OK;
}


/*
 * What a member answers, through the module's one send path: a list (a)
 * or a failure (status, type, body), both in memory that lives as long as
 * the merging request (its pool; a list's entry stays pinned till then).
 */

void
ngx_http_modelcache_aggregate_record(ngx_http_modelcache_ctx_t *ctx,
    ngx_uint_t status, ngx_str_t *type, ngx_str_t *body,
    ngx_http_modelcache_answer_t *a)
{
    ngx_http_modelcache_member_t  *m;

    m = &ctx->agg->members[ctx->member - 1];

    if (a) {
        m->ok = 1;
        m->answer = *a;
        m->answer.label = m->label;
        return;
    }

    m->ok = 0;
    m->status = status;
    m->content_type = *type;
    m->body = *body;
}


/* may run more than once for one member: the first time counts */

static ngx_int_t
ngx_http_modelcache_aggregate_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc)
{
    ngx_http_modelcache_member_t  *m = data;

    ngx_http_modelcache_agg_t  *agg;

    if (m->done) {
        return sr->connection->error ? rc : NGX_OK;
    }

    m->done = 1;
    agg = m->ctx->agg;

    if (!m->ok && m->status == 0) {
        /* it ended without an answer of its own (out of memory, say) */
        m->status = (rc >= NGX_HTTP_BAD_REQUEST && rc < 600)
                    ? (ngx_uint_t) rc : NGX_HTTP_BAD_GATEWAY;
        ngx_str_null(&m->content_type);
        ngx_str_null(&m->body);
    }

    if (--agg->pending == 0 && agg->r) {
        (void) ngx_http_post_request(agg->r, NULL);
    }

    /* a provider's failure is the merge's to answer; only the client's kills */
    return sr->connection->error ? rc : NGX_OK;
}


static void
ngx_http_modelcache_aggregate_resume(ngx_http_request_t *r)
{
    ngx_http_modelcache_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);

    if (ctx == NULL || ctx->agg == NULL || ctx->agg->pending) {
        return;
    }

    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_finalize_request(r, ngx_http_modelcache_aggregate_answer(r, ctx));
}


/*
 * The providers' lists in directive order, the failed ones named in
 * X-Modelcache-Partial; the status: HIT if all were, else the first other.
 */

static ngx_int_t
ngx_http_modelcache_aggregate_answer(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx)
{
    ngx_uint_t                      i, n;
    ngx_http_modelcache_agg_t      *agg;
    ngx_http_modelcache_answer_t   *a;
    ngx_http_modelcache_member_t   *m;

    agg = ctx->agg;
    m = agg->members;

    a = ngx_palloc(r->pool, agg->n * sizeof(ngx_http_modelcache_answer_t));
    if (a == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    n = 0;
    ctx->status = NGX_HTTP_MODELCACHE_HIT;

    for (i = 0; i < agg->n; i++) {
        if (!m[i].ok) {
            continue;
        }

        a[n++] = m[i].answer;

        if (ctx->status == NGX_HTTP_MODELCACHE_HIT) {
            ctx->status = m[i].ctx->status;
        }
    }

    if (n == 0) {
        return ngx_http_modelcache_aggregate_failed(r, agg);
    }

    if (n < agg->n
        && ngx_http_modelcache_aggregate_partial(r, agg) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_modelcache_handler_derive(r, ctx, a, n);
}


static ngx_int_t
ngx_http_modelcache_aggregate_partial(ngx_http_request_t *r,
    ngx_http_modelcache_agg_t *agg)
{
    u_char      *p;
    size_t       len;
    ngx_str_t    value;
    ngx_uint_t   i;

    len = 0;

    for (i = 0; i < agg->n; i++) {
        len += agg->members[i].label.len + 1;
    }

    value.data = ngx_pnalloc(r->pool, len);
    if (value.data == NULL) {
        return NGX_ERROR;
    }

    p = value.data;

    for (i = 0; i < agg->n; i++) {
        if (agg->members[i].ok) {
            continue;
        }

        if (p != value.data) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, agg->members[i].label.data,
                       agg->members[i].label.len);
    }

    value.len = p - value.data;

    return ngx_http_modelcache_add_header(r, "X-Modelcache-Partial", &value,
                                          NULL);
}


/*
 * Every provider failed: their answer if they all failed alike (the same
 * status: e.g. the caller's key is refused by all), else a 502 naming each
 */

static ngx_int_t
ngx_http_modelcache_aggregate_failed(ngx_http_request_t *r,
    ngx_http_modelcache_agg_t *agg)
{
    u_char                        *p, *last;
    ngx_str_t                      msg;
    ngx_uint_t                     i;
    ngx_http_modelcache_ctx_t     *ctx;
    ngx_http_modelcache_member_t  *m;

    m = agg->members;
    ctx = ngx_http_get_module_ctx(r, ngx_http_modelcache_module);
    ctx->status = NGX_HTTP_MODELCACHE_ERROR;

    for (i = 1; i < agg->n; i++) {
        if (m[i].status != m[0].status) {
            break;
        }
    }

    if (i == agg->n && m[0].body.len) {
        return ngx_http_modelcache_send(r, m[0].status, &m[0].content_type,
                                        &m[0].body);
    }

    p = ngx_pnalloc(r->pool, NGX_MAX_ERROR_STR);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    msg.data = p;
    last = p + NGX_MAX_ERROR_STR;
    p = ngx_slprintf(p, last, "every provider failed:");

    for (i = 0; i < agg->n; i++) {
        p = ngx_slprintf(p, last, "%s %V: %ui", i ? "," : "", &m[i].label,
                         m[i].status);
    }

    msg.len = p - msg.data;

    return ngx_http_modelcache_send_json_error(r, NGX_HTTP_BAD_GATEWAY,
                                               "modelcache_upstream_error",
                                               &msg);
}
