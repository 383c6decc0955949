
/*
 * ngx_http_modelcache_json: what jansson tells us about provider bodies.
 * Runs in request memory, outside the zone lock; nothing from jansson is
 * ever kept beyond the call.
 */


#include "ngx_http_modelcache.h"

#include <jansson.h>


static ngx_int_t ngx_http_modelcache_json_reason(ngx_pool_t *pool,
    ngx_str_t *reason, const char *fmt, ...);


/*
 * A body is a model list when it is a JSON object holding an array under
 * "data" (OpenAI, Anthropic, LM Studio, OpenRouter) or "models" (Ollama,
 * Gemini).  Otherwise NGX_DECLINED and *reason says why, for the client's
 * error body and the log.
 */

ngx_int_t
ngx_http_modelcache_json_validate(u_char *body, size_t len,
    ngx_str_t *reason, ngx_pool_t *pool)
{
    json_t        *root, *list;
    ngx_int_t      rc;
    json_error_t   err;

    root = json_loadb((const char *) body, len, 0, &err);

    if (root == NULL) {
        return ngx_http_modelcache_json_reason(pool, reason,
                   "provider answered 200 with invalid JSON: %s "
                   "(line %d, column %d)", err.text, err.line, err.column);
    }

    rc = NGX_OK;

    if (!json_is_object(root)) {
        rc = ngx_http_modelcache_json_reason(pool, reason,
                 "provider answered 200 with JSON that is not an object");
        goto done;
    }

    list = json_object_get(root, "data");
    if (list == NULL) {
        list = json_object_get(root, "models");
    }

    if (list == NULL) {
        rc = ngx_http_modelcache_json_reason(pool, reason,
                 json_object_get(root, "error")
                 ? "provider answered 200 with an error object"
                 : "provider answered 200 without a model list "
                   "(no \"data\" or \"models\" array)");
        goto done;
    }

    if (!json_is_array(list)) {
        rc = ngx_http_modelcache_json_reason(pool, reason,
                 "provider answered 200 with a model list that is "
                 "not an array");
    }

done:

    json_decref(root);

    return rc;
}


static ngx_int_t
ngx_http_modelcache_json_reason(ngx_pool_t *pool, ngx_str_t *reason,
    const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    p = ngx_pnalloc(pool, NGX_MAX_ERROR_STR);
    if (p == NULL) {
        return NGX_ERROR;
    }

    va_start(args, fmt);
    reason->len = ngx_vslprintf(p, p + NGX_MAX_ERROR_STR, fmt, args) - p;
    va_end(args);

    reason->data = p;

    return NGX_DECLINED;
}
