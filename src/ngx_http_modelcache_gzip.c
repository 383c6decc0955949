
/*
 * ngx_http_modelcache_gzip: the gzip copy of a list, made once per fetch,
 * in request memory and outside the zone lock, so that a hit for a client
 * that accepts gzip never compresses.
 */


#include "ngx_http_modelcache.h"

#include <zlib.h>


static void *ngx_http_modelcache_gzip_alloc(void *opaque, u_int items,
    u_int size);
static void ngx_http_modelcache_gzip_free(void *opaque, void *address);


/*
 * The gzip member of body, and its ETag.  NGX_DECLINED when it would not
 * be smaller: the list is then only kept as it is.
 */

ngx_int_t
ngx_http_modelcache_gzip(ngx_pool_t *pool, u_char *body, size_t len,
    ngx_str_t *gz, u_char *etag)
{
    int       rc;
    z_stream  zs;

    ngx_str_null(gz);

    ngx_memzero(&zs, sizeof(z_stream));

    zs.zalloc = ngx_http_modelcache_gzip_alloc;
    zs.zfree = ngx_http_modelcache_gzip_free;
    zs.opaque = pool;

    /* windowBits 15 + 16: a gzip header and trailer around the deflate */
    if (deflateInit2(&zs, NGX_HTTP_MODELCACHE_GZIP_LEVEL, Z_DEFLATED,
                     MAX_WBITS + 16, MAX_MEM_LEVEL - 1, Z_DEFAULT_STRATEGY)
        != Z_OK)
    {
        return NGX_ERROR;
    }

    gz->len = deflateBound(&zs, len);
    gz->data = ngx_pnalloc(pool, gz->len);

    if (gz->data == NULL) {
        (void) deflateEnd(&zs);
        return NGX_ERROR;
    }

    zs.next_in = body;
    zs.avail_in = len;
    zs.next_out = gz->data;
    zs.avail_out = gz->len;

    /* the output has room for the bound: one call compresses everything */
    rc = deflate(&zs, Z_FINISH);

    gz->len = zs.total_out;

    (void) deflateEnd(&zs);

    if (rc != Z_STREAM_END) {
        ngx_str_null(gz);
        return NGX_ERROR;
    }

    if (gz->len >= len) {
        ngx_str_null(gz);
        return NGX_DECLINED;
    }

    return ngx_http_modelcache_key_etag(gz->data, gz->len, etag);
}


static void *
ngx_http_modelcache_gzip_alloc(void *opaque, u_int items, u_int size)
{
    return ngx_palloc(opaque, items * size);
}


static void
ngx_http_modelcache_gzip_free(void *opaque, void *address)
{
    /* the pool frees it with the request */
}
