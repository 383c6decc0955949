
/*
 * ngx_http_modelcache_key: the key material of a request (pass URI, scope,
 * credentials) and its 256-bit digest; derived answers' keys; the ETag of
 * a body.
 */


#include "ngx_http_modelcache.h"

#include <openssl/evp.h>


static EVP_MD_CTX *ngx_http_modelcache_key_start(void);
static ngx_int_t ngx_http_modelcache_key_add(EVP_MD_CTX *md, u_char *data,
    size_t len);
static ngx_int_t ngx_http_modelcache_key_end(EVP_MD_CTX *md, u_char *key);


/*
 * One SHA-256 and one digest context per process, made once: with
 * OpenSSL 3 an implicit EVP_sha256() fetch and a context per request cost
 * more than the digest itself.
 */
static EVP_MD      *ngx_http_modelcache_sha256;
static EVP_MD_CTX  *ngx_http_modelcache_md;


/*
 * key = SHA-256("modelcache/2" | len pass | pass | len scope | scope | n |
 *               for each credential: len value | value).
 * Lengths keep fields from running into each other.  The credentials'
 * clear text goes into the digest and nowhere else: no part of the key
 * can be turned back into them.
 */

ngx_int_t
ngx_http_modelcache_key_build(ngx_http_request_t *r,
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_http_modelcache_ctx_t *ctx)
{
    ngx_str_t                    value;
    ngx_uint_t                   i, n;
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

    n = mlcf->credentials ? mlcf->credentials->nelts : 0;
    cv = mlcf->credentials ? mlcf->credentials->elts : NULL;

    md = ngx_http_modelcache_key_start();

    if (md == NULL
        || ngx_http_modelcache_key_add(md, (u_char *) "modelcache/2", 12)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, ctx->pass.data, ctx->pass.len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, ctx->scope.data, ctx->scope.len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, (u_char *) &n, sizeof(ngx_uint_t))
           != NGX_OK)
    {
        goto failed;
    }

    for (i = 0; i < n; i++) {
        if (ngx_http_complex_value(r, &cv[i], &value) != NGX_OK
            || ngx_http_modelcache_key_add(md, value.data, value.len)
               != NGX_OK)
        {
            goto failed;
        }
    }

    if (ngx_http_modelcache_key_end(md, ctx->key) == NGX_OK) {
        return NGX_OK;
    }

failed:

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "modelcache: cannot compute the key");

    return NGX_ERROR;
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
    ngx_uint_t                     i, v[3];
    ngx_str_t                      none, *lookup;
    EVP_MD_CTX                    *md;
    ngx_http_modelcache_filter_t  *f, empty;

    ngx_str_null(&none);
    ngx_memzero(&empty, sizeof(ngx_http_modelcache_filter_t));

    f = (d->filter && d->filter->set) ? d->filter : &empty;
    lookup = d->lookup ? d->lookup : &none;

    v[0] = d->lookup ? 1 : 0;
    v[1] = (ngx_uint_t) f->sort;
    v[2] = f->limit;

    md = ngx_http_modelcache_key_start();

    if (md == NULL
        || ngx_http_modelcache_key_add(md, (u_char *) "modelcache/derived",
                                       18) != NGX_OK
        || ngx_http_modelcache_key_add(md, d->mlcf->transform.data,
                                       d->mlcf->transform.len) != NGX_OK
        || ngx_http_modelcache_key_add(md, (u_char *) v, sizeof(v)) != NGX_OK
        || ngx_http_modelcache_key_add(md, lookup->data, lookup->len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, f->q.data, f->q.len) != NGX_OK
        || ngx_http_modelcache_key_add(md, f->owned_by.data, f->owned_by.len)
           != NGX_OK
        || ngx_http_modelcache_key_add(md, f->after.data, f->after.len)
           != NGX_OK)
    {
        goto failed;
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
            goto failed;
        }
    }

    if (ngx_http_modelcache_key_end(md, key) == NGX_OK) {
        return NGX_OK;
    }

failed:

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "modelcache: cannot compute a derived key");

    return NGX_ERROR;
}


/* the process's digest context, reset for a new SHA-256 */

static EVP_MD_CTX *
ngx_http_modelcache_key_start(void)
{
    if (ngx_http_modelcache_md == NULL) {
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
        ngx_http_modelcache_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
        ngx_http_modelcache_sha256 = (EVP_MD *) EVP_sha256();
#endif
        if (ngx_http_modelcache_sha256 == NULL) {
            return NULL;
        }

        ngx_http_modelcache_md = EVP_MD_CTX_new();
        if (ngx_http_modelcache_md == NULL) {
            return NULL;
        }
    }

    if (EVP_DigestInit_ex(ngx_http_modelcache_md, ngx_http_modelcache_sha256,
                          NULL)
        != 1)
    {
        return NULL;
    }

    return ngx_http_modelcache_md;
}


static ngx_int_t
ngx_http_modelcache_key_end(EVP_MD_CTX *md, u_char *key)
{
    u_char        digest[EVP_MAX_MD_SIZE];
    unsigned int  len;

    if (EVP_DigestFinal_ex(md, digest, &len) != 1
        || len != NGX_HTTP_MODELCACHE_KEY_LEN)
    {
        return NGX_ERROR;
    }

    ngx_memcpy(key, digest, NGX_HTTP_MODELCACHE_KEY_LEN);

    return NGX_OK;
}


/* exit_process: what key_start() made */

void
ngx_http_modelcache_key_cleanup(void)
{
    if (ngx_http_modelcache_md) {
        EVP_MD_CTX_free(ngx_http_modelcache_md);
        ngx_http_modelcache_md = NULL;
    }

#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
    if (ngx_http_modelcache_sha256) {
        EVP_MD_free(ngx_http_modelcache_sha256);
    }
#endif

    ngx_http_modelcache_sha256 = NULL;
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


/* etag: '"' + hex of the first 16 bytes of SHA-256(body) + '"' */

ngx_int_t
ngx_http_modelcache_key_etag(u_char *body, size_t len, u_char *etag)
{
    u_char        digest[EVP_MAX_MD_SIZE];
    unsigned int  n;
    EVP_MD_CTX   *md;

    md = ngx_http_modelcache_key_start();

    if (md == NULL
        || (len && EVP_DigestUpdate(md, body, len) != 1)
        || EVP_DigestFinal_ex(md, digest, &n) != 1)
    {
        return NGX_ERROR;
    }

    etag[0] = '"';
    ngx_hex_dump(etag + 1, digest, 16);
    etag[NGX_HTTP_MODELCACHE_ETAG_LEN - 1] = '"';

    return NGX_OK;
}
