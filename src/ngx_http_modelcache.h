
/*
 * ngx_http_modelcache: the one private header.
 * Types shared by the module's files, constants and cross-file prototypes.
 */


#ifndef _NGX_HTTP_MODELCACHE_H_INCLUDED_
#define _NGX_HTTP_MODELCACHE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#define NGX_HTTP_MODELCACHE_KEY_LEN        32
#define NGX_HTTP_MODELCACHE_KEY_HEX_LEN    (2 * NGX_HTTP_MODELCACHE_KEY_LEN)

/* a strong ETag: '"' + 32 hex digits of the body's digest + '"' */
#define NGX_HTTP_MODELCACHE_ETAG_LEN       34


typedef enum {
    NGX_HTTP_MODELCACHE_NONE = 0,
    NGX_HTTP_MODELCACHE_HIT,
    NGX_HTTP_MODELCACHE_MISS,
    NGX_HTTP_MODELCACHE_EXPIRED,
    NGX_HTTP_MODELCACHE_STALE,
    NGX_HTTP_MODELCACHE_UPDATING,
    NGX_HTTP_MODELCACHE_BYPASS,
    NGX_HTTP_MODELCACHE_ERROR
} ngx_http_modelcache_status_e;


/* counters since the zone was created; they survive reloads with it */
typedef struct {
    ngx_atomic_t                     hits;
    ngx_atomic_t                     misses;
    ngx_atomic_t                     expired;
    ngx_atomic_t                     stale;
    ngx_atomic_t                     updating;
    ngx_atomic_t                     bypass;
    ngx_atomic_t                     errors;
    ngx_atomic_t                     upstream_fetches;
    ngx_atomic_t                     evictions;
    ngx_atomic_t                     purged;
    ngx_atomic_t                     lock_waits;
    ngx_atomic_t                     derived_builds;
    ngx_atomic_t                     derived_hits;
} ngx_http_modelcache_counters_t;


/* the layout of _sh_t and its nodes; a zone of another layout is not reused */
#define NGX_HTTP_MODELCACHE_MAGIC          0x6d6f64656c630005

/* how often a newcomer may check that a fetch's owner still exists (ms) */
#define NGX_HTTP_MODELCACHE_OWNER_CHECK    50

/* pins are kept by process, so that a killed worker's can be released */
#define NGX_HTTP_MODELCACHE_PIN_SLOTS      8

/* how long a failed fetch's answer stays for the requests that waited */
#define NGX_HTTP_MODELCACHE_FAILED_KEEP    2

/* a failed answer larger than this is not kept for the waiters */
#define NGX_HTTP_MODELCACHE_FAILED_MAX     65536

/* the gzip copy of a list, made once per fetch: gzip -6, as gzip_static's */
#define NGX_HTTP_MODELCACHE_GZIP_LEVEL     6

/*
 * What a list entry may keep of derived answers: clients choose variants
 * freely, and must not push other callers' lists out of the zone with them.
 * Up to DERIVED_MAX answers of at most DERIVED_RATIO times the list's size
 * plus DERIVED_SLACK bytes; the oldest make room.
 */
#define NGX_HTTP_MODELCACHE_DERIVED_MAX    1024
#define NGX_HTTP_MODELCACHE_DERIVED_RATIO  4
#define NGX_HTTP_MODELCACHE_DERIVED_SLACK  65536

/* the cross-worker poll of a waiting request backs off up to this (ms) */
#define NGX_HTTP_MODELCACHE_WAIT_MAX       4


/* the root of a zone, in shpool->data */
typedef struct {
    uint64_t                         magic;
    ngx_rbtree_t                     rbtree;
    ngx_rbtree_node_t                sentinel;
    ngx_queue_t                      lru;          /* most recent first */
    ngx_queue_t                      dead;         /* unlinked, pinned */
    ngx_uint_t                       entries;
    ngx_uint_t                       derived;
    ngx_rbtree_t                     locks;
    ngx_rbtree_node_t                locks_sentinel;
    ngx_queue_t                      failed;       /* newest first */
    ngx_uint_t                       fetch_seq;    /* fetch generations */
    ngx_http_modelcache_counters_t   counters;
} ngx_http_modelcache_sh_t;


typedef struct {
    ngx_pid_t                        pid;
    ngx_uint_t                       n;
} ngx_http_modelcache_pin_t;


/*
 * One stored entry, a single slab allocation: the struct, then the scope,
 * the pass URI, the body and its gzip copy.  Once linked into the tree an entry is never
 * written again except for its LRU links, "accessed", "pins" and its
 * children queue; a newer answer for the same key is a new entry that
 * replaces it.  A derived answer (lookup, filter variant, merged list) is
 * an entry too, the child of the list entry it was made from: it has no
 * scope or pass, and goes when its parent goes.
 */
typedef struct ngx_http_modelcache_node_s  ngx_http_modelcache_node_t;

struct ngx_http_modelcache_node_s {
    ngx_rbtree_node_t                node;         /* node.key: key prefix */
    ngx_queue_t                      queue;
    u_char                           key[NGX_HTTP_MODELCACHE_KEY_LEN];
    u_char                           etag[NGX_HTTP_MODELCACHE_ETAG_LEN];
    ngx_http_modelcache_node_t      *parent;       /* derived: its list */
    ngx_queue_t                      children;     /* list: oldest first */
    ngx_queue_t                      sibling;      /* derived: in children */
    unsigned                         dead:1;       /* unlinked, not freed */
    ngx_uint_t                       pins;         /* all, pin[] and more */
    ngx_http_modelcache_pin_t        pin[NGX_HTTP_MODELCACHE_PIN_SLOTS];
    ngx_uint_t                       nchildren;
    size_t                           children_size;
    time_t                           fetched;
    time_t                           expires;
    time_t                           accessed;
    ngx_uint_t                       gen;          /* of its fetch; 0: none */
    ngx_msec_t                       started;      /* when its fetch began */
    size_t                           scope_len;
    size_t                           pass_len;
    size_t                           body_len;
    u_char                          *body;
    size_t                           gz_len;       /* 0: no gzip copy */
    u_char                          *gz;
    u_char                           gz_etag[NGX_HTTP_MODELCACHE_ETAG_LEN];
    u_char                           data[1];
};


/*
 * A fetch in flight for a key: one request, in any worker, owns it until
 * the deadline; the others wait.  A failed fetch leaves its answer here for
 * FAILED_KEEP seconds, for the requests that waited on it (same gen).
 */
typedef struct {
    ngx_rbtree_node_t                node;         /* node.key: key prefix */
    ngx_queue_t                      queue;        /* in sh->failed */
    u_char                           key[NGX_HTTP_MODELCACHE_KEY_LEN];
    ngx_pid_t                        owner;
    ngx_msec_t                       deadline;
    ngx_msec_t                       started;
    ngx_msec_t                       checked;      /* owner seen alive */
    ngx_uint_t                       gen;
    ngx_uint_t                       bypass;       /* a refresh fetches */
    time_t                           failed;       /* 0: fetching */
    ngx_uint_t                       status;
    size_t                           type_len;
    size_t                           body_len;
    u_char                          *answer;       /* type, then body */
} ngx_http_modelcache_lock_t;


/* a zone as this cycle sees it (shm_zone->data) */
typedef struct {
    ngx_http_modelcache_sh_t        *sh;
    ngx_slab_pool_t                 *shpool;
    ngx_shm_zone_t                  *shm_zone;
    size_t                           max_entry;
    time_t                           inactive;
} ngx_http_modelcache_zone_t;


typedef struct {
    ngx_shm_zone_t                  *shm_zone;
    ngx_str_t                        directive;
    u_char                          *file;
    ngx_uint_t                       line;
} ngx_http_modelcache_zone_ref_t;


typedef struct {
    ngx_array_t                     *credentials;  /* the default set */
    ngx_array_t                      zone_refs;    /* _zone_ref_t */
} ngx_http_modelcache_main_conf_t;


typedef struct {
    ngx_http_complex_value_t         uri;
    ngx_str_t                        provider;
} ngx_http_modelcache_pass_t;


/* modelcache_hide, modelcache_show */
typedef struct {
    ngx_str_t                        source;       /* as written, ~* too */
    ngx_regex_t                     *regex;
} ngx_http_modelcache_rule_t;


typedef struct {
    ngx_shm_zone_t                  *shm_zone;     /* modelcache NAME */
    ngx_array_t                     *passes;       /* _pass_t */
    time_t                           ttl;
    ngx_http_complex_value_t        *scope;
    ngx_array_t                     *bypass;       /* complex values */
    ngx_http_complex_value_t        *lookup;
    ngx_flag_t                       filter;
    ngx_array_t                     *hide;         /* _rule_t */
    ngx_array_t                     *show;         /* _rule_t */
    ngx_str_t                        list_field;   /* empty: auto */
    ngx_str_t                        transform;    /* all of the above */
    ngx_array_t                     *credentials;  /* complex values; NULL: off */
    ngx_flag_t                       status_header;
    ngx_msec_t                       lock_timeout;
    time_t                           stale_while_revalidate;
    time_t                           stale_if_error;

    ngx_shm_zone_t                  *purge_zone;
    ngx_shm_zone_t                  *stats_zone;

    unsigned                         enabled_set:1;
    unsigned                         labelled:1;   /* provider=LABEL */
} ngx_http_modelcache_loc_conf_t;


/* what a fetch subrequest brought back */
typedef struct {
    ngx_http_request_t              *sr;
    ngx_int_t                        rc;           /* as finalized */
    ngx_uint_t                       status;       /* provider's status */
    ngx_str_t                        content_type;
    ngx_str_t                        content_encoding;
    ngx_str_t                        www_authenticate;
    ngx_str_t                        retry_after;
    off_t                            content_length;

    u_char                          *body;
    size_t                           len;
    size_t                           size;

    unsigned                         header:1;     /* provider answered */
    unsigned                         last:1;       /* saw the last buffer */
    unsigned                         done:1;       /* finalized */
} ngx_http_modelcache_fetch_t;


/* an answer for the client that is not a stored list */
typedef struct {
    ngx_uint_t                       status;
    ngx_str_t                        content_type;
    ngx_str_t                        body;
} ngx_http_modelcache_failure_t;


typedef enum {
    NGX_HTTP_MODELCACHE_LOCK_OWNER = 0,    /* fetch */
    NGX_HTTP_MODELCACHE_LOCK_TAKEN,        /* fetch: the owner was too late */
    NGX_HTTP_MODELCACHE_LOCK_BUSY,         /* another request fetches */
    NGX_HTTP_MODELCACHE_LOCK_HIT,          /* the entry is there */
    NGX_HTTP_MODELCACHE_LOCK_FAILED,       /* the fetch we waited on failed */
    NGX_HTTP_MODELCACHE_LOCK_NONE          /* no room for a lock: fetch */
} ngx_http_modelcache_lock_e;


/* modelcache_filter: the client's args, checked */
typedef struct {
    ngx_str_t                        q;
    ngx_str_t                        owned_by;
    ngx_str_t                        after;
    ngx_int_t                        sort;         /* _SORT_*, negated: desc */
    ngx_uint_t                       limit;        /* 0: none */
    unsigned                         set:1;        /* any of them given */
} ngx_http_modelcache_filter_t;

#define NGX_HTTP_MODELCACHE_SORT_ID        1
#define NGX_HTTP_MODELCACHE_SORT_CREATED   2

#define NGX_HTTP_MODELCACHE_LIMIT_MAX      100000


typedef struct ngx_http_modelcache_agg_s  ngx_http_modelcache_agg_t;


typedef struct {
    ngx_http_modelcache_zone_t      *zone;
    ngx_http_modelcache_node_t      *node;         /* pinned while serving */
    ngx_http_modelcache_node_t      *stale;        /* pinned, expired */
    ngx_http_modelcache_node_t      *derived;      /* pinned, served */

    u_char                           key[NGX_HTTP_MODELCACHE_KEY_LEN];
    ngx_str_t                        pass;
    ngx_str_t                        scope;

    ngx_http_modelcache_status_e     status;
    time_t                           age;

    ngx_http_modelcache_fetch_t      fetch;
    u_char                           etag[NGX_HTTP_MODELCACHE_ETAG_LEN];
    ngx_str_t                        gz;           /* the fetch's gzip copy */
    u_char                           gz_etag[NGX_HTTP_MODELCACHE_ETAG_LEN];

    /* single flight: the lock we own, or the fetch we wait for */
    ngx_uint_t                       lock_gen;
    ngx_uint_t                       join_gen;     /* a bypass's fetch */
    ngx_msec_t                       arrived;
    ngx_msec_t                       started;      /* our fetch began */
    ngx_event_t                      wait_event;
    ngx_queue_t                      wait_queue;   /* this worker's waiters */
    ngx_msec_t                       wait_until;
    ngx_msec_t                       wait_delay;
    ngx_http_modelcache_failure_t    failure;

    ngx_http_modelcache_filter_t     filter;

    /* aggregation: the merging request's, or a member's (member: 1 + n) */
    ngx_http_modelcache_agg_t       *agg;
    ngx_uint_t                       member;

    unsigned                         lock_owner:1;
    unsigned                         waiting:1;
    unsigned                         waited:1;
    unsigned                         settled:1;
    unsigned                         bypass:1;
    unsigned                         adopted:1;    /* a member running */
} ngx_http_modelcache_ctx_t;


/* stored answer to serve, from a pinned entry or from request memory */
typedef struct {
    u_char                          *body;
    size_t                           len;
    u_char                          *etag;
    time_t                           fetched;
    time_t                           age;
    time_t                           max_age;
    u_char                          *gz;           /* or NULL */
    size_t                           gz_len;
    u_char                          *gz_etag;
    ngx_http_modelcache_node_t      *node;         /* body's entry, or NULL */
    u_char                          *key;          /* of that list */
    ngx_str_t                        label;        /* its provider=LABEL */
} ngx_http_modelcache_answer_t;


/* one provider of a merged list, fetched by a subrequest of its own */
typedef struct {
    ngx_http_modelcache_ctx_t       *ctx;
    ngx_str_t                        label;
    ngx_http_modelcache_answer_t     answer;       /* ok */
    ngx_uint_t                       status;       /* failed: HTTP status */
    ngx_str_t                        content_type;
    ngx_str_t                        body;
    unsigned                         done:1;
    unsigned                         ok:1;
} ngx_http_modelcache_member_t;


struct ngx_http_modelcache_agg_s {
    ngx_http_request_t              *r;
    ngx_http_modelcache_member_t    *members;
    ngx_uint_t                       n;
    ngx_uint_t                       pending;
};


/* what a derived answer is made of and what it came to */
typedef struct {
    ngx_http_modelcache_answer_t    *sources;
    ngx_uint_t                       nsources;
    ngx_http_modelcache_loc_conf_t  *mlcf;
    ngx_str_t                       *lookup;       /* or NULL */
    ngx_http_modelcache_filter_t    *filter;       /* or NULL */

    ngx_str_t                        out;
    const char                      *param;        /* NGX_DECLINED: 404 */
} ngx_http_modelcache_derive_t;


extern ngx_module_t  ngx_http_modelcache_module;


/* zone */
ngx_int_t ngx_http_modelcache_zone_init(ngx_shm_zone_t *shm_zone, void *data);
ngx_http_modelcache_status_e ngx_http_modelcache_zone_lookup(
    ngx_http_modelcache_zone_t *zone, u_char *key, time_t stale,
    ngx_http_modelcache_node_t **nodep, ngx_http_modelcache_node_t **stalep);
void ngx_http_modelcache_zone_unpin(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *node);
ngx_int_t ngx_http_modelcache_zone_store(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, time_t ttl, u_char *etag,
    ngx_log_t *log);
void ngx_http_modelcache_zone_delete(ngx_http_modelcache_zone_t *zone,
    u_char *key);
ngx_uint_t ngx_http_modelcache_zone_purge(ngx_http_modelcache_zone_t *zone,
    ngx_str_t *scope, ngx_str_t *pass);
ngx_http_modelcache_lock_e ngx_http_modelcache_zone_lock(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_ctx_t *ctx,
    ngx_msec_t timeout, ngx_pool_t *pool);
void ngx_http_modelcache_zone_unlock(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_failure_t *failure);
void ngx_http_modelcache_zone_usage(ngx_http_modelcache_zone_t *zone,
    ngx_uint_t *entries, ngx_uint_t *derived, size_t *used);
ngx_http_modelcache_node_t *ngx_http_modelcache_zone_derived_lookup(
    ngx_http_modelcache_zone_t *zone, u_char *key);
void ngx_http_modelcache_zone_derived_store(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *parent, u_char *key, ngx_str_t *body,
    u_char *etag);

/* key */
ngx_int_t ngx_http_modelcache_key_build(ngx_http_request_t *r,
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_http_modelcache_ctx_t *ctx);
ngx_int_t ngx_http_modelcache_key_etag(u_char *body, size_t len, u_char *etag);
ngx_int_t ngx_http_modelcache_key_derived(ngx_http_request_t *r,
    ngx_http_modelcache_derive_t *d, u_char *key);
void ngx_http_modelcache_key_cleanup(void);

/* gzip */
ngx_int_t ngx_http_modelcache_gzip(ngx_pool_t *pool, u_char *body, size_t len,
    ngx_str_t *gz, u_char *etag);

/* fetch */
ngx_int_t ngx_http_modelcache_fetch(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
void ngx_http_modelcache_fetch_background(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
void ngx_http_modelcache_fetch_release(ngx_http_modelcache_ctx_t *ctx,
    ngx_http_modelcache_failure_t *failure);
void ngx_http_modelcache_fetch_cleanup(ngx_http_modelcache_ctx_t *ctx);
ngx_int_t ngx_http_modelcache_fetch_init_filters(ngx_conf_t *cf);

/* json */
ngx_int_t ngx_http_modelcache_json_validate(u_char *body, size_t len,
    ngx_str_t *field, ngx_str_t *reason, ngx_pool_t *pool);
ngx_int_t ngx_http_modelcache_json_derive(ngx_http_modelcache_derive_t *d,
    ngx_pool_t *pool);

/* aggregate */
ngx_int_t ngx_http_modelcache_aggregate(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
void ngx_http_modelcache_aggregate_record(ngx_http_modelcache_ctx_t *ctx,
    ngx_uint_t status, ngx_str_t *type, ngx_str_t *body,
    ngx_http_modelcache_answer_t *a);

/* handler */
ngx_int_t ngx_http_modelcache_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_modelcache_handler_serve(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_node_t *node);
ngx_int_t ngx_http_modelcache_handler_settle(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
ngx_int_t ngx_http_modelcache_handler_failure(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
void ngx_http_modelcache_handler_fetched(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx);
ngx_int_t ngx_http_modelcache_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, ngx_str_t *body);
ngx_int_t ngx_http_modelcache_send_json_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, ngx_str_t *message);
ngx_int_t ngx_http_modelcache_handler_derive(ngx_http_request_t *r,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_answer_t *a,
    ngx_uint_t n);
ngx_int_t ngx_http_modelcache_send_not_allowed(ngx_http_request_t *r,
    char *allow);
ngx_int_t ngx_http_modelcache_add_header(ngx_http_request_t *r,
    const char *name, ngx_str_t *value, ngx_table_elt_t **hp);
ngx_str_t *ngx_http_modelcache_log_escape(ngx_pool_t *pool, ngx_str_t *src);
ngx_int_t ngx_http_modelcache_add_variables(ngx_conf_t *cf);

/* admin handlers */
ngx_int_t ngx_http_modelcache_purge_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_modelcache_stats_handler(ngx_http_request_t *r);


#endif /* _NGX_HTTP_MODELCACHE_H_INCLUDED_ */
