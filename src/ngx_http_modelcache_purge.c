
/*
 * ngx_http_modelcache_purge: the modelcache_purge location.  PURGE, POST or
 * DELETE drops every entry of a zone, or those of a scope and/or pass URI.
 */


#include "ngx_http_modelcache.h"


static ngx_int_t ngx_http_modelcache_purge_args(ngx_http_request_t *r,
    ngx_str_t *scope, ngx_str_t *pass, ngx_str_t *error);
static ngx_int_t ngx_http_modelcache_purge_unescape(ngx_http_request_t *r,
    u_char *src, size_t len, ngx_str_t *dst);


ngx_int_t
ngx_http_modelcache_purge_handler(ngx_http_request_t *r)
{
    u_char                          *p;
    ngx_int_t                        rc;
    ngx_str_t                        scope, pass, error, answer, type;
    ngx_uint_t                       n;
    ngx_http_modelcache_zone_t      *zone;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    if (!(r->method & (NGX_HTTP_POST|NGX_HTTP_DELETE))
        && !(r->method_name.len == 5
             && ngx_strncmp(r->method_name.data, "PURGE", 5) == 0))
    {
        return ngx_http_modelcache_send_not_allowed(r,
                                                    "PURGE, POST, DELETE");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_modelcache_purge_args(r, &scope, &pass, &error);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == NGX_DECLINED) {
        return ngx_http_modelcache_send_json_error(r, NGX_HTTP_BAD_REQUEST,
                                             "modelcache_bad_request", &error);
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);
    zone = mlcf->purge_zone->data;

    n = ngx_http_modelcache_zone_purge(zone, scope.data ? &scope : NULL,
                                       pass.data ? &pass : NULL);

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "modelcache purge in zone \"%V\": scope %s\"%V\" "
                  "pass %s\"%V\", %ui entries purged",
                  &zone->shm_zone->shm.name,
                  scope.data ? "" : "(any) ",
                  ngx_http_modelcache_log_escape(r->pool, &scope),
                  pass.data ? "" : "(any) ",
                  ngx_http_modelcache_log_escape(r->pool, &pass), n);

    p = ngx_pnalloc(r->pool, sizeof("{\"purged\":}\n") - 1 + NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    answer.data = p;
    answer.len = ngx_sprintf(p, "{\"purged\":%ui}\n", n) - p;

    ngx_str_set(&type, "application/json");

    return ngx_http_modelcache_send(r, NGX_HTTP_OK, &type, &answer);
}


/*
 * scope=LABEL and pass=URI, each at most once, percent-decoded; anything
 * else is the client's mistake (NGX_DECLINED, *error says which).
 * An absent argument leaves its string's data NULL.
 */

static ngx_int_t
ngx_http_modelcache_purge_args(ngx_http_request_t *r, ngx_str_t *scope,
    ngx_str_t *pass, ngx_str_t *error)
{
    u_char     *p, *end, *amp, *eq;
    ngx_str_t   name, *arg;

    ngx_str_null(scope);
    ngx_str_null(pass);

    p = r->args.data;
    end = p + r->args.len;

    for ( /* void */ ; p < end; p = amp + 1) {

        amp = ngx_strlchr(p, end, '&');
        if (amp == NULL) {
            amp = end;
        }

        if (amp == p) {
            continue;
        }

        eq = ngx_strlchr(p, amp, '=');

        name.data = p;
        name.len = (eq ? eq : amp) - p;

        if (name.len == 5 && ngx_strncmp(p, "scope", 5) == 0) {
            arg = scope;

        } else if (name.len == 4 && ngx_strncmp(p, "pass", 4) == 0) {
            arg = pass;

        } else {
            ngx_str_set(error, "unknown argument, expected scope= and/or "
                               "pass=");
            return NGX_DECLINED;
        }

        if (eq == NULL) {
            ngx_str_set(error, "argument without a value");
            return NGX_DECLINED;
        }

        if (arg->data) {
            ngx_str_set(error, "argument given twice");
            return NGX_DECLINED;
        }

        switch (ngx_http_modelcache_purge_unescape(r, eq + 1, amp - eq - 1,
                                                   arg))
        {
        case NGX_ERROR:
            return NGX_ERROR;

        case NGX_DECLINED:
            ngx_str_set(error, "bad percent-encoding in an argument");
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_modelcache_purge_unescape(ngx_http_request_t *r, u_char *src,
    size_t len, ngx_str_t *dst)
{
    u_char     *d, *end;
    ngx_int_t   hi, lo;

    /* non-NULL even when empty: "scope=" names the empty scope */

    d = ngx_pnalloc(r->pool, len + 1);
    if (d == NULL) {
        return NGX_ERROR;
    }

    dst->data = d;
    end = src + len;

    while (src < end) {

        if (*src != '%') {
            *d++ = *src++;
            continue;
        }

        if (end - src < 3) {
            return NGX_DECLINED;
        }

        hi = ngx_hextoi(src + 1, 1);
        lo = ngx_hextoi(src + 2, 1);

        if (hi == NGX_ERROR || lo == NGX_ERROR) {
            return NGX_DECLINED;
        }

        *d++ = (u_char) (hi * 16 + lo);
        src += 3;
    }

    dst->len = d - dst->data;

    return NGX_OK;
}
