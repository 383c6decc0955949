
/*
 * ngx_http_modelcache_json: what jansson tells us about provider bodies.
 * Runs in request memory, outside the zone lock; nothing from jansson is
 * ever kept beyond the call.
 */


#include "ngx_http_modelcache.h"

#include <jansson.h>


static ngx_int_t ngx_http_modelcache_json_reason(ngx_pool_t *pool,
    ngx_str_t *reason, const char *fmt, ...);
static json_t *ngx_http_modelcache_json_list(json_t *root);
static json_t *ngx_http_modelcache_json_find(json_t *list, ngx_str_t *id);


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

    list = ngx_http_modelcache_json_list(root);

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


/*
 * modelcache_lookup: the model object whose "id" (or "name", for Ollama and
 * Gemini) is the value, as given or, when it holds '%', percent-decoded.
 * NGX_OK with the object in *out (compact JSON, request memory),
 * NGX_DECLINED when the list has no such model.
 */

ngx_int_t
ngx_http_modelcache_json_lookup(u_char *body, size_t len, ngx_str_t *id,
    ngx_str_t *out, ngx_pool_t *pool)
{
    char       *dump;
    u_char     *dst, *src;
    json_t     *root, *list, *model;
    ngx_int_t   rc;
    ngx_str_t   decoded;

    /* a stored body was validated: it parses and has a list */
    root = json_loadb((const char *) body, len, 0, NULL);
    if (root == NULL) {
        return NGX_ERROR;
    }

    rc = NGX_DECLINED;
    list = ngx_http_modelcache_json_list(root);

    model = ngx_http_modelcache_json_find(list, id);

    if (model == NULL && ngx_strlchr(id->data, id->data + id->len, '%')) {
        decoded.data = ngx_pnalloc(pool, id->len);
        if (decoded.data == NULL) {
            rc = NGX_ERROR;
            goto done;
        }

        dst = decoded.data;
        src = id->data;
        ngx_unescape_uri(&dst, &src, id->len, 0);
        decoded.len = dst - decoded.data;

        model = ngx_http_modelcache_json_find(list, &decoded);
    }

    if (model == NULL) {
        goto done;
    }

    rc = NGX_ERROR;

    dump = json_dumps(model, JSON_COMPACT);
    if (dump == NULL) {
        goto done;
    }

    out->len = ngx_strlen(dump);
    out->data = ngx_pnalloc(pool, out->len);

    if (out->data) {
        ngx_memcpy(out->data, dump, out->len);
        rc = NGX_OK;
    }

    free(dump);

done:

    json_decref(root);

    return rc;
}


static json_t *
ngx_http_modelcache_json_list(json_t *root)
{
    json_t  *list;

    list = json_object_get(root, "data");

    return list ? list : json_object_get(root, "models");
}


static json_t *
ngx_http_modelcache_json_find(json_t *list, ngx_str_t *id)
{
    size_t       i;
    json_t      *model, *v;
    const char  *s;

    json_array_foreach(list, i, model) {

        v = json_object_get(model, "id");
        if (v == NULL) {
            v = json_object_get(model, "name");
        }

        s = json_string_value(v);

        if (s && json_string_length(v) == id->len
            && ngx_memcmp(s, id->data, id->len) == 0)
        {
            return model;
        }
    }

    return NULL;
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
