
/*
 * ngx_http_modelcache_stats: the modelcache_stats location.  A zone's size,
 * use and counters as JSON or in the Prometheus text exposition format.
 */


#include "ngx_http_modelcache.h"


#define NGX_HTTP_MODELCACHE_GAUGE     0
#define NGX_HTTP_MODELCACHE_COUNTER   1


typedef struct {
    ngx_str_t                    name;         /* JSON */
    ngx_str_t                    prom;         /* Prometheus */
    const char                  *help;
    ngx_uint_t                   type;
} ngx_http_modelcache_metric_t;


static ngx_int_t ngx_http_modelcache_stats_prometheus(ngx_http_request_t *r,
    ngx_int_t *prometheus);
static void ngx_http_modelcache_stats_values(ngx_http_modelcache_zone_t *zone,
    ngx_atomic_uint_t *values);
static ngx_buf_t *ngx_http_modelcache_stats_json(ngx_http_request_t *r,
    ngx_str_t *zone, ngx_atomic_uint_t *values);
static ngx_buf_t *ngx_http_modelcache_stats_text(ngx_http_request_t *r,
    ngx_str_t *zone, ngx_atomic_uint_t *values);


/* the order of ngx_http_modelcache_stats_values() */
static ngx_http_modelcache_metric_t  ngx_http_modelcache_metrics[] = {
    { ngx_string("size"), ngx_string("modelcache_zone_size_bytes"),
      "size of the shared memory zone in bytes", NGX_HTTP_MODELCACHE_GAUGE },
    { ngx_string("used"), ngx_string("modelcache_zone_used_bytes"),
      "bytes of the zone in use", NGX_HTTP_MODELCACHE_GAUGE },
    { ngx_string("entries"), ngx_string("modelcache_entries"),
      "entries stored", NGX_HTTP_MODELCACHE_GAUGE },
    { ngx_string("hits"), ngx_string("modelcache_hits_total"),
      "requests answered from a fresh entry", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("misses"), ngx_string("modelcache_misses_total"),
      "requests that found no entry", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("expired"), ngx_string("modelcache_expired_total"),
      "requests that found an expired entry", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("stale"), ngx_string("modelcache_stale_total"),
      "requests answered with a stale entry", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("updating"), ngx_string("modelcache_updating_total"),
      "requests answered while a refresh ran", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("bypass"), ngx_string("modelcache_bypass_total"),
      "requests that bypassed the cache", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("errors"), ngx_string("modelcache_errors_total"),
      "requests answered with a provider error", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("upstream_fetches"), ngx_string("modelcache_upstream_fetches_total"),
      "subrequests sent to providers", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("evictions"), ngx_string("modelcache_evictions_total"),
      "entries evicted for room or inactivity", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("purged"), ngx_string("modelcache_purged_total"),
      "entries purged", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("lock_waits"), ngx_string("modelcache_lock_waits_total"),
      "requests that waited for another's fetch", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("derived"), ngx_string("modelcache_derived_entries"),
      "derived answers stored (lookups, filter variants, merged lists)",
      NGX_HTTP_MODELCACHE_GAUGE },
    { ngx_string("derived_builds"),
      ngx_string("modelcache_derived_builds_total"),
      "derived answers computed from a list", NGX_HTTP_MODELCACHE_COUNTER },
    { ngx_string("derived_hits"), ngx_string("modelcache_derived_hits_total"),
      "derived answers served as stored", NGX_HTTP_MODELCACHE_COUNTER }
};

#define NGX_HTTP_MODELCACHE_NMETRICS                                         \
    (sizeof(ngx_http_modelcache_metrics)                                     \
     / sizeof(ngx_http_modelcache_metric_t))


ngx_int_t
ngx_http_modelcache_stats_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc, prometheus;
    ngx_buf_t                       *b;
    ngx_str_t                        msg, type, body;
    ngx_atomic_uint_t                values[NGX_HTTP_MODELCACHE_NMETRICS];
    ngx_http_modelcache_zone_t      *zone;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_http_modelcache_send_not_allowed(r, "GET, HEAD");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (ngx_http_modelcache_stats_prometheus(r, &prometheus) != NGX_OK) {
        ngx_str_set(&msg, "format must be \"json\" or \"prometheus\"");
        return ngx_http_modelcache_send_json_error(r, NGX_HTTP_BAD_REQUEST,
                                              "modelcache_bad_request", &msg);
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_modelcache_module);
    zone = mlcf->stats_zone->data;

    ngx_http_modelcache_stats_values(zone, values);

    if (prometheus) {
        b = ngx_http_modelcache_stats_text(r, &zone->shm_zone->shm.name,
                                           values);
        ngx_str_set(&type, "text/plain; version=0.0.4; charset=utf-8");

    } else {
        b = ngx_http_modelcache_stats_json(r, &zone->shm_zone->shm.name,
                                           values);
        ngx_str_set(&type, "application/json");
    }

    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    body.data = b->pos;
    body.len = b->last - b->pos;

    return ngx_http_modelcache_send(r, NGX_HTTP_OK, &type, &body);
}


/* ?format= wins; without it, "Accept: text/plain" asks for Prometheus */

static ngx_int_t
ngx_http_modelcache_stats_prometheus(ngx_http_request_t *r,
    ngx_int_t *prometheus)
{
    ngx_str_t         format;
    ngx_table_elt_t  *accept;

    if (ngx_http_arg(r, (u_char *) "format", 6, &format) == NGX_OK) {

        if (format.len == 10
            && ngx_strncmp(format.data, "prometheus", 10) == 0)
        {
            *prometheus = 1;
            return NGX_OK;
        }

        if (format.len == 4 && ngx_strncmp(format.data, "json", 4) == 0) {
            *prometheus = 0;
            return NGX_OK;
        }

        return NGX_DECLINED;
    }

    accept = r->headers_in.accept;

    *prometheus = accept
                  && ngx_strlcasestrn(accept->value.data,
                                      accept->value.data + accept->value.len,
                                      (u_char *) "text/plain", 10 - 1)
                     != NULL;

    return NGX_OK;
}


static void
ngx_http_modelcache_stats_values(ngx_http_modelcache_zone_t *zone,
    ngx_atomic_uint_t *values)
{
    size_t                           used;
    ngx_uint_t                       entries, derived;
    ngx_http_modelcache_counters_t  *c;

    ngx_http_modelcache_zone_usage(zone, &entries, &derived, &used);

    c = &zone->sh->counters;

    values[0] = zone->shm_zone->shm.size;
    values[1] = used;
    values[2] = entries;
    values[3] = c->hits;
    values[4] = c->misses;
    values[5] = c->expired;
    values[6] = c->stale;
    values[7] = c->updating;
    values[8] = c->bypass;
    values[9] = c->errors;
    values[10] = c->upstream_fetches;
    values[11] = c->evictions;
    values[12] = c->purged;
    values[13] = c->lock_waits;
    values[14] = derived;
    values[15] = c->derived_builds;
    values[16] = c->derived_hits;
}


static ngx_buf_t *
ngx_http_modelcache_stats_json(ngx_http_request_t *r, ngx_str_t *zone,
    ngx_atomic_uint_t *values)
{
    size_t                         size;
    ngx_buf_t                     *b;
    ngx_uint_t                     i;
    ngx_http_modelcache_metric_t  *m;

    m = ngx_http_modelcache_metrics;

    size = sizeof("{\"zone\":\"\"}\n") + zone->len
           + ngx_escape_json(NULL, zone->data, zone->len);

    for (i = 0; i < NGX_HTTP_MODELCACHE_NMETRICS; i++) {
        size += sizeof(",\"\":") - 1 + m[i].name.len + NGX_ATOMIC_T_LEN;
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NULL;
    }

    b->last = ngx_cpymem(b->last, "{\"zone\":\"", sizeof("{\"zone\":\"") - 1);
    b->last = (u_char *) ngx_escape_json(b->last, zone->data, zone->len);
    *b->last++ = '"';

    for (i = 0; i < NGX_HTTP_MODELCACHE_NMETRICS; i++) {
        b->last = ngx_sprintf(b->last, ",\"%V\":%uA", &m[i].name, values[i]);
    }

    b->last = ngx_cpymem(b->last, "}\n", 2);

    return b;
}


static ngx_buf_t *
ngx_http_modelcache_stats_text(ngx_http_request_t *r, ngx_str_t *zone,
    ngx_atomic_uint_t *values)
{
    size_t                         size, zlen;
    ngx_buf_t                     *b;
    ngx_uint_t                     i;
    ngx_http_modelcache_metric_t  *m;

    m = ngx_http_modelcache_metrics;

    /* the label value's escapes (\" and \\) are JSON's too */
    zlen = zone->len + ngx_escape_json(NULL, zone->data, zone->len);

    size = 0;

    for (i = 0; i < NGX_HTTP_MODELCACHE_NMETRICS; i++) {
        size += 3 * m[i].prom.len + ngx_strlen(m[i].help) + zlen
                + sizeof("# HELP  \n# TYPE  counter\n{zone=\"\"} \n")
                + NGX_ATOMIC_T_LEN;
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NULL;
    }

    for (i = 0; i < NGX_HTTP_MODELCACHE_NMETRICS; i++) {
        b->last = ngx_sprintf(b->last,
                              "# HELP %V %s\n# TYPE %V %s\n%V{zone=\"",
                              &m[i].prom, m[i].help, &m[i].prom,
                              m[i].type == NGX_HTTP_MODELCACHE_COUNTER
                              ? "counter" : "gauge",
                              &m[i].prom);
        b->last = (u_char *) ngx_escape_json(b->last, zone->data, zone->len);
        b->last = ngx_sprintf(b->last, "\"} %uA\n", values[i]);
    }

    return b;
}
