
/*
 * ngx_http_modelcache_key: the key material of a request (pass URI, scope,
 * credential digests) and its 256-bit digest; the ETag of a body.
 */


#include "ngx_http_modelcache.h"

#include <openssl/evp.h>


static ngx_int_t ngx_http_modelcache_key_add(EVP_MD_CTX *md, u_char *data,
    size_t len);


/*
 * key = SHA-256("modelcache/1" | len pass | pass | len scope | scope | n |
 *               for each credential: SHA-256(value)).
 * Lengths keep fields from running into each other; credentials go in
 * already digested, so their clear text is never part of anything we keep.
 */

ngx_int_t
ngx_http_modelcache_key_build(ngx_http_request_t *r,
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_http_modelcache_ctx_t *ctx)
{
    u_char                       digest[EVP_MAX_MD_SIZE];
    ngx_int_t                    rc;
    ngx_str_t                    value;
    ngx_uint_t                   i, n;
    unsigned int                 len;
    EVP_MD_CTX                  *md;
    ngx_http_complex_value_t    *cv;
    ngx_http_modelcache_pass_t  *pass;

    /* a member of a merge fetches its own provider */
    pass = mlcf->passes->elts;
    pass += ctx->member ? ctx->member - 1 : 0;

    if (ngx_http_complex_value(r, &pass->uri, &ctx->pass) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_str_null(&ctx->scope);

    if (mlcf->scope
        && ngx_http_complex_value(r, mlcf->scope, &ctx->scope) != NGX_OK)
    {
        return NGX_ERROR;
    }

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return NGX_ERROR;
    }

    rc = NGX_ERROR;

    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1
        || ngx_http_modelcache_key_add(md, (u_char *) "modelcache/1", 12)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, ctx->pass.data, ctx->pass.len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, ctx->scope.data, ctx->scope.len)
           != NGX_OK)
    {
        goto done;
    }

    n = mlcf->credentials ? mlcf->credentials->nelts : 0;
    cv = mlcf->credentials ? mlcf->credentials->elts : NULL;

    if (ngx_http_modelcache_key_add(md, (u_char *) &n, sizeof(ngx_uint_t))
        != NGX_OK)
    {
        goto done;
    }

    for (i = 0; i < n; i++) {
        if (ngx_http_complex_value(r, &cv[i], &value) != NGX_OK) {
            goto done;
        }

        if (EVP_Digest(value.data, value.len, digest, &len, EVP_sha256(),
                       NULL)
            != 1
            || ngx_http_modelcache_key_add(md, digest, len) != NGX_OK)
        {
            goto done;
        }
    }

    if (EVP_DigestFinal_ex(md, digest, &len) != 1
        || len != NGX_HTTP_MODELCACHE_KEY_LEN)
    {
        goto done;
    }

    ngx_memcpy(ctx->key, digest, NGX_HTTP_MODELCACHE_KEY_LEN);

    rc = NGX_OK;

done:

    EVP_MD_CTX_free(md);

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "modelcache: cannot compute the key");
    }

    return rc;
}


static ngx_int_t
ngx_http_modelcache_key_add(EVP_MD_CTX *md, u_char *data, size_t len)
{
    if (EVP_DigestUpdate(md, &len, sizeof(size_t)) != 1) {
        return NGX_ERROR;
    }

    if (len && EVP_DigestUpdate(md, data, len) != 1) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * A derived answer's key: SHA-256("modelcache/derived" | the location's
 * transform (list field, hide, show, labels) | lookup value | filter args |
 * for each list: its key and ETag).  A newer list, or another location's
 * rules, make another key.
 */

ngx_int_t
ngx_http_modelcache_key_derived(ngx_http_request_t *r,
    ngx_http_modelcache_derive_t *d, u_char *key)
{
    u_char                         digest[EVP_MAX_MD_SIZE];
    ngx_int_t                      rc;
    ngx_uint_t                     i, v[3];
    unsigned int                   len;
    EVP_MD_CTX                    *md;
    ngx_str_t                      none;
    ngx_http_modelcache_filter_t  *f, empty;

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return NGX_ERROR;
    }

    ngx_str_null(&none);
    ngx_memzero(&empty, sizeof(ngx_http_modelcache_filter_t));

    f = (d->filter && d->filter->set) ? d->filter : &empty;

    v[0] = d->lookup ? 1 : 0;
    v[1] = (ngx_uint_t) f->sort;
    v[2] = f->limit;

    rc = NGX_ERROR;

    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1
        || ngx_http_modelcache_key_add(md, (u_char *) "modelcache/derived",
                                       18) != NGX_OK
        || ngx_http_modelcache_key_add(md, d->mlcf->transform.data,
                                       d->mlcf->transform.len) != NGX_OK
        || ngx_http_modelcache_key_add(md, (u_char *) v, sizeof(v)) != NGX_OK
        || ngx_http_modelcache_key_add(md,
                                       (d->lookup ? d->lookup : &none)->data,
                                       (d->lookup ? d->lookup : &none)->len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, f->q.data, f->q.len) != NGX_OK
        || ngx_http_modelcache_key_add(md, f->owned_by.data, f->owned_by.len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, f->after.data, f->after.len)
           != NGX_OK)
    {
        goto done;
    }

    for (i = 0; i < d->nsources; i++) {
        if (ngx_http_modelcache_key_add(md, d->sources[i].key,
                                        NGX_HTTP_MODELCACHE_KEY_LEN)
            != NGX_OK
            || ngx_http_modelcache_key_add(md, d->sources[i].etag,
                                           NGX_HTTP_MODELCACHE_ETAG_LEN)
               != NGX_OK
            || ngx_http_modelcache_key_add(md, d->sources[i].label.data,
                                           d->sources[i].label.len)
               != NGX_OK)
        {
            goto done;
        }
    }

    if (EVP_DigestFinal_ex(md, digest, &len) == 1
        && len == NGX_HTTP_MODELCACHE_KEY_LEN)
    {
        ngx_memcpy(key, digest, NGX_HTTP_MODELCACHE_KEY_LEN);
        rc = NGX_OK;
    }

done:

    EVP_MD_CTX_free(md);

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "modelcache: cannot compute a derived key");
    }

    return rc;
}


/* etag: '"' + hex of the first 16 bytes of SHA-256(body) + '"' */

ngx_int_t
ngx_http_modelcache_key_etag(u_char *body, size_t len, u_char *etag)
{
    u_char        digest[EVP_MAX_MD_SIZE];
    unsigned int  n;

    if (EVP_Digest(body, len, digest, &n, EVP_sha256(), NULL) != 1) {
        return NGX_ERROR;
    }

    etag[0] = '"';
    ngx_hex_dump(etag + 1, digest, 16);
    etag[NGX_HTTP_MODELCACHE_ETAG_LEN - 1] = '"';

    return NGX_OK;
}
