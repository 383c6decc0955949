
/*
 * ngx_http_modelcache_zone: the shared-memory zone.  Init and reuse on
 * reload, the rbtree + LRU queue, pin/unpin, allocation with eviction, purge.
 * Everything here runs under the zone lock for tree/LRU/memcpy work only.
 */


#include "ngx_http_modelcache.h"


static void ngx_http_modelcache_zone_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static ngx_http_modelcache_node_t *ngx_http_modelcache_zone_find_locked(
    ngx_http_modelcache_zone_t *zone, u_char *key);
static ngx_rbtree_node_t *ngx_http_modelcache_zone_find_in(ngx_rbtree_t *tree,
    u_char *key);
static void ngx_http_modelcache_zone_unlink_locked(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_node_t *node);
static void ngx_http_modelcache_zone_expire_locked(
    ngx_http_modelcache_zone_t *zone, time_t now);
static ngx_int_t ngx_http_modelcache_zone_evict_locked(
    ngx_http_modelcache_zone_t *zone);
static void ngx_http_modelcache_zone_touch_locked(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_node_t *node,
    time_t now);
static void ngx_http_modelcache_zone_pin_locked(
    ngx_http_modelcache_node_t *node);
static ngx_uint_t ngx_http_modelcache_zone_pinned_locked(
    ngx_http_modelcache_node_t *node);
static void ngx_http_modelcache_zone_collect_locked(
    ngx_http_modelcache_zone_t *zone);
static ngx_uint_t ngx_http_modelcache_zone_owner_alive(
    ngx_http_modelcache_lock_t *lk, ngx_msec_t msec);
static ngx_uint_t ngx_http_modelcache_zone_gone(ngx_pid_t pid);
static u_char *ngx_http_modelcache_zone_copy(u_char *dst, u_char *src,
    size_t len);
static void *ngx_http_modelcache_zone_alloc(ngx_http_modelcache_zone_t *zone,
    size_t size);
static void *ngx_http_modelcache_zone_alloc_locked(
    ngx_http_modelcache_zone_t *zone, size_t size);
static ngx_http_modelcache_node_t *ngx_http_modelcache_zone_fresh_locked(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_ctx_t *ctx,
    time_t now);
static ngx_http_modelcache_lock_t *ngx_http_modelcache_zone_find_lock_locked(
    ngx_http_modelcache_zone_t *zone, u_char *key);
static ngx_int_t ngx_http_modelcache_zone_failure_copy(
    ngx_http_modelcache_lock_t *lk, ngx_http_modelcache_failure_t *failure,
    ngx_pool_t *pool);
static void ngx_http_modelcache_zone_failure_free_locked(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_lock_t *lk);
static void ngx_http_modelcache_zone_free_lock_locked(
    ngx_http_modelcache_zone_t *zone, ngx_http_modelcache_lock_t *lk);
static void ngx_http_modelcache_zone_drop_failed_locked(
    ngx_http_modelcache_zone_t *zone, time_t before);


ngx_int_t
ngx_http_modelcache_zone_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_modelcache_zone_t  *ozone = data;

    size_t                       len;
    ngx_http_modelcache_zone_t  *zone;

    zone = shm_zone->data;

    if (ozone) {
        if (ozone->sh == NULL || ozone->shpool == NULL
            || ozone->sh->magic != NGX_HTTP_MODELCACHE_MAGIC)
        {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "modelcache zone \"%V\" was made by another "
                          "version of the module: change its size or "
                          "restart nginx", &shm_zone->shm.name);
            return NGX_ERROR;
        }

        zone->sh = ozone->sh;
        zone->shpool = ozone->shpool;

        return NGX_OK;
    }

    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;
        return NGX_OK;
    }

    zone->sh = ngx_slab_alloc(zone->shpool, sizeof(ngx_http_modelcache_sh_t));
    if (zone->sh == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(zone->sh, sizeof(ngx_http_modelcache_sh_t));

    zone->shpool->data = zone->sh;

    zone->sh->magic = NGX_HTTP_MODELCACHE_MAGIC;

    ngx_rbtree_init(&zone->sh->rbtree, &zone->sh->sentinel,
                    ngx_http_modelcache_zone_rbtree_insert);

    ngx_rbtree_init(&zone->sh->locks, &zone->sh->locks_sentinel,
                    ngx_http_modelcache_zone_rbtree_insert);

    ngx_queue_init(&zone->sh->lru);
    ngx_queue_init(&zone->sh->dead);
    ngx_queue_init(&zone->sh->failed);

    len = sizeof(" in modelcache zone \"\"") + shm_zone->shm.name.len;

    zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
    if (zone->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(zone->shpool->log_ctx, " in modelcache zone \"%V\"%Z",
                &shm_zone->shm.name);

    /* running out of memory is expected: we evict, and alert if that fails */
    zone->shpool->log_nomem = 0;

    return NGX_OK;
}


/*
 * A fresh entry is pinned and returned (HIT): the caller serves its body
 * straight from shared memory and unpins when the request is done.  An
 * entry expired less than "stale" seconds ago is pinned too (EXPIRED,
 * *stalep), for stale-while-revalidate and stale-if-error.
 */

ngx_http_modelcache_status_e
ngx_http_modelcache_zone_lookup(ngx_http_modelcache_zone_t *zone, u_char *key,
    time_t stale, ngx_http_modelcache_node_t **nodep,
    ngx_http_modelcache_node_t **stalep)
{
    time_t                        now;
    ngx_http_modelcache_node_t   *node;
    ngx_http_modelcache_status_e  status;

    now = ngx_time();
    status = NGX_HTTP_MODELCACHE_MISS;

    ngx_shmtx_lock(&zone->shpool->mutex);

    node = ngx_http_modelcache_zone_find_locked(zone, key);

    if (node) {
        ngx_http_modelcache_zone_touch_locked(zone, node, now);

        if (node->expires > now) {
            ngx_http_modelcache_zone_pin_locked(node);
            *nodep = node;
            status = NGX_HTTP_MODELCACHE_HIT;

        } else {
            if (node->expires + stale > now) {
                ngx_http_modelcache_zone_pin_locked(node);
                *stalep = node;
            }

            status = NGX_HTTP_MODELCACHE_EXPIRED;
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return status;
}


void
ngx_http_modelcache_zone_unpin(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *node)
{
    ngx_uint_t                  i;
    ngx_http_modelcache_pin_t  *pin;

    ngx_shmtx_lock(&zone->shpool->mutex);

    node->pins--;

    for (i = 0; i < NGX_HTTP_MODELCACHE_PIN_SLOTS; i++) {
        pin = &node->pin[i];

        if (pin->pid == ngx_pid && pin->n) {
            pin->n--;
            break;
        }
    }

    if (node->dead && node->pins == 0) {
        ngx_queue_remove(&node->queue);
        ngx_slab_free_locked(zone->shpool, node);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


/* read now: most recently used, and not inactive */

static void
ngx_http_modelcache_zone_touch_locked(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *node, time_t now)
{
    node->accessed = now;
    ngx_queue_remove(&node->queue);
    ngx_queue_insert_head(&zone->sh->lru, &node->queue);
}


/* a pin goes in this process's slot; beyond the slots, it is only counted */

static void
ngx_http_modelcache_zone_pin_locked(ngx_http_modelcache_node_t *node)
{
    ngx_uint_t                  i;
    ngx_http_modelcache_pin_t  *pin, *free;

    node->pins++;
    free = NULL;

    for (i = 0; i < NGX_HTTP_MODELCACHE_PIN_SLOTS; i++) {
        pin = &node->pin[i];

        if (pin->n && pin->pid == ngx_pid) {
            pin->n++;
            return;
        }

        if (pin->n == 0 && free == NULL) {
            free = pin;
        }
    }

    if (free) {
        free->pid = ngx_pid;
        free->n = 1;
    }
}


/*
 * Whether the entry is being sent; pins of processes that no longer exist
 * (a worker killed while sending) are released on the way.
 */

static ngx_uint_t
ngx_http_modelcache_zone_pinned_locked(ngx_http_modelcache_node_t *node)
{
    ngx_uint_t                  i;
    ngx_http_modelcache_pin_t  *pin;

    for (i = 0; node->pins && i < NGX_HTTP_MODELCACHE_PIN_SLOTS; i++) {
        pin = &node->pin[i];

        if (pin->n && pin->pid != ngx_pid
            && ngx_http_modelcache_zone_gone(pin->pid))
        {
            node->pins -= pin->n;
            pin->n = 0;
        }
    }

    return node->pins;
}


/* entries unlinked while pinned: freed once their readers are gone */

static void
ngx_http_modelcache_zone_collect_locked(ngx_http_modelcache_zone_t *zone)
{
    ngx_queue_t                 *q, *next;
    ngx_http_modelcache_node_t  *node;

    for (q = ngx_queue_head(&zone->sh->dead);
         q != ngx_queue_sentinel(&zone->sh->dead);
         q = next)
    {
        next = ngx_queue_next(q);
        node = ngx_queue_data(q, ngx_http_modelcache_node_t, queue);

        if (!ngx_http_modelcache_zone_pinned_locked(node)) {
            ngx_queue_remove(&node->queue);
            ngx_slab_free_locked(zone->shpool, node);
        }
    }
}


/*
 * Nobody waits for a killed worker's fetch until its deadline: the owner
 * is looked for at most every OWNER_CHECK ms per lock (a worker killed a
 * moment ago may still be a zombie, alive to kill(); the next look sees).
 */

static ngx_uint_t
ngx_http_modelcache_zone_owner_alive(ngx_http_modelcache_lock_t *lk,
    ngx_msec_t msec)
{
    if (lk->owner == ngx_pid
        || (ngx_msec_int_t) (msec - lk->checked)
           < NGX_HTTP_MODELCACHE_OWNER_CHECK)
    {
        return 1;
    }

    lk->checked = msec;

    return !ngx_http_modelcache_zone_gone(lk->owner);
}


/* an empty string may have no data at all: memcpy() must not see it */

static u_char *
ngx_http_modelcache_zone_copy(u_char *dst, u_char *src, size_t len)
{
    return len ? ngx_cpymem(dst, src, len) : dst;
}


static ngx_uint_t
ngx_http_modelcache_zone_gone(ngx_pid_t pid)
{
    return kill(pid, 0) == -1 && ngx_errno == NGX_ESRCH;
}


/*
 * Stores ctx's fetched body under ctx's key, replacing any older entry.
 * The new entry is filled while no other process can see it, then linked
 * in; readers of the old one keep it pinned until they are done.
 */

ngx_int_t
ngx_http_modelcache_zone_store(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, time_t ttl, u_char *etag, ngx_log_t *log)
{
    u_char                      *p;
    size_t                       size;
    time_t                       now;
    ngx_http_modelcache_node_t  *node, *old;

    size = offsetof(ngx_http_modelcache_node_t, data)
           + ctx->scope.len + ctx->pass.len + ctx->fetch.len + ctx->gz.len;

    node = ngx_http_modelcache_zone_alloc(zone, size);

    if (node == NULL) {
        ngx_log_error(NGX_LOG_ALERT, log, 0,
                      "modelcache zone \"%V\" has no room for an entry of "
                      "%uz bytes even after eviction, serving uncached",
                      &zone->shm_zone->shm.name, size);
        return NGX_ERROR;
    }

    now = ngx_time();

    ngx_memzero(node, offsetof(ngx_http_modelcache_node_t, data));

    ngx_memcpy(node->key, ctx->key, NGX_HTTP_MODELCACHE_KEY_LEN);
    ngx_memcpy(node->etag, etag, NGX_HTTP_MODELCACHE_ETAG_LEN);
    ngx_memcpy(&node->node.key, ctx->key, sizeof(ngx_rbtree_key_t));

    ngx_queue_init(&node->children);

    node->fetched = now;
    node->expires = now + ttl;
    node->accessed = now;
    node->gen = ctx->lock_owner ? ctx->lock_gen : 0;
    node->started = ctx->started;

    node->scope_len = ctx->scope.len;
    node->pass_len = ctx->pass.len;
    node->body_len = ctx->fetch.len;

    p = ngx_http_modelcache_zone_copy(node->data, ctx->scope.data,
                                      ctx->scope.len);
    p = ngx_http_modelcache_zone_copy(p, ctx->pass.data, ctx->pass.len);
    node->body = p;
    p = ngx_http_modelcache_zone_copy(p, ctx->fetch.body, ctx->fetch.len);

    if (ctx->gz.len) {
        node->gz = p;
        node->gz_len = ctx->gz.len;
        ngx_memcpy(node->gz_etag, ctx->gz_etag, NGX_HTTP_MODELCACHE_ETAG_LEN);
        ngx_memcpy(p, ctx->gz.data, ctx->gz.len);
    }

    ngx_shmtx_lock(&zone->shpool->mutex);

    old = ngx_http_modelcache_zone_find_locked(zone, ctx->key);

    if (old) {
        ngx_http_modelcache_zone_unlink_locked(zone, old);
    }

    ngx_rbtree_insert(&zone->sh->rbtree, &node->node);
    ngx_queue_insert_head(&zone->sh->lru, &node->queue);
    zone->sh->entries++;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return NGX_OK;
}


void
ngx_http_modelcache_zone_delete(ngx_http_modelcache_zone_t *zone, u_char *key)
{
    ngx_http_modelcache_node_t  *node;

    ngx_shmtx_lock(&zone->shpool->mutex);

    node = ngx_http_modelcache_zone_find_locked(zone, key);

    if (node) {
        ngx_http_modelcache_zone_unlink_locked(zone, node);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


/*
 * A derived answer (lookup, filter variant, merged list), pinned, or NULL.
 * Its key holds the digests of the lists it was made from, so a newer
 * list never finds the answer of an older one.
 */

ngx_http_modelcache_node_t *
ngx_http_modelcache_zone_derived_lookup(ngx_http_modelcache_zone_t *zone,
    u_char *key)
{
    ngx_http_modelcache_node_t  *node;

    ngx_shmtx_lock(&zone->shpool->mutex);

    node = ngx_http_modelcache_zone_find_locked(zone, key);

    if (node) {
        ngx_http_modelcache_zone_touch_locked(zone, node, ngx_time());
        ngx_http_modelcache_zone_pin_locked(node);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return node;
}


/*
 * Keeps a derived answer as a child of the list entry it came from (the
 * caller has that entry pinned); not if the entry went meanwhile, or if
 * another request stored the same answer first.
 */

void
ngx_http_modelcache_zone_derived_store(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *parent, u_char *key, ngx_str_t *body,
    u_char *etag)
{
    size_t                       budget;
    time_t                       now;
    ngx_http_modelcache_node_t  *node, *old;

    budget = NGX_HTTP_MODELCACHE_DERIVED_RATIO * parent->body_len
             + NGX_HTTP_MODELCACHE_DERIVED_SLACK;

    if (body->len > zone->max_entry || body->len > budget) {
        return;
    }

    node = ngx_http_modelcache_zone_alloc(zone,
                          offsetof(ngx_http_modelcache_node_t, data)
                          + body->len);
    if (node == NULL) {
        return;
    }

    now = ngx_time();

    ngx_memzero(node, offsetof(ngx_http_modelcache_node_t, data));

    ngx_memcpy(node->key, key, NGX_HTTP_MODELCACHE_KEY_LEN);
    ngx_memcpy(node->etag, etag, NGX_HTTP_MODELCACHE_ETAG_LEN);
    ngx_memcpy(&node->node.key, key, sizeof(ngx_rbtree_key_t));
    ngx_queue_init(&node->children);

    node->fetched = parent->fetched;
    node->expires = parent->expires;
    node->accessed = now;
    node->body_len = body->len;
    node->body = node->data;
    (void) ngx_http_modelcache_zone_copy(node->data, body->data, body->len);

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (parent->dead || ngx_http_modelcache_zone_find_locked(zone, key)) {
        ngx_slab_free_locked(zone->shpool, node);
        goto done;
    }

    /* the list's oldest derived answers make room */

    while (parent->nchildren >= NGX_HTTP_MODELCACHE_DERIVED_MAX
           || parent->children_size + body->len > budget)
    {
        old = ngx_queue_data(ngx_queue_head(&parent->children),
                             ngx_http_modelcache_node_t, sibling);
        ngx_http_modelcache_zone_unlink_locked(zone, old);
        (void) ngx_atomic_fetch_add(&zone->sh->counters.evictions, 1);
    }

    node->parent = parent;
    parent->nchildren++;
    parent->children_size += body->len;
    ngx_queue_insert_tail(&parent->children, &node->sibling);

    ngx_rbtree_insert(&zone->sh->rbtree, &node->node);
    ngx_queue_insert_head(&zone->sh->lru, &node->queue);
    zone->sh->derived++;

done:

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


/* scope or pass NULL: any; returns how many entries went */

ngx_uint_t
ngx_http_modelcache_zone_purge(ngx_http_modelcache_zone_t *zone,
    ngx_str_t *scope, ngx_str_t *pass)
{
    ngx_uint_t                   n;
    ngx_queue_t                 *q, *next;
    ngx_http_modelcache_node_t  *node;

    n = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (q = ngx_queue_head(&zone->sh->lru);
         q != ngx_queue_sentinel(&zone->sh->lru);
         q = next)
    {
        next = ngx_queue_next(q);
        node = ngx_queue_data(q, ngx_http_modelcache_node_t, queue);

        if (node->parent) {
            /* derived: goes with its list */
            continue;
        }

        if (scope
            && (scope->len != node->scope_len
                || ngx_memcmp(scope->data, node->data, scope->len) != 0))
        {
            continue;
        }

        if (pass
            && (pass->len != node->pass_len
                || ngx_memcmp(pass->data, node->data + node->scope_len,
                              pass->len)
                   != 0))
        {
            continue;
        }

        /* the unlink frees the node's children: "next" must not be one */
        while (next != ngx_queue_sentinel(&zone->sh->lru)
               && ((ngx_http_modelcache_node_t *)
                   ((u_char *) next
                    - offsetof(ngx_http_modelcache_node_t, queue)))->parent
                  == node)
        {
            next = ngx_queue_next(next);
        }

        ngx_http_modelcache_zone_unlink_locked(zone, node);
        n++;
    }

    if (scope == NULL && pass == NULL) {
        /* failed fetches' answers go too; fetches in flight stay */
        ngx_http_modelcache_zone_drop_failed_locked(zone,
                                                    NGX_MAX_TIME_T_VALUE);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    (void) ngx_atomic_fetch_add(&zone->sh->counters.purged, n);

    return n;
}


/*
 * Single flight.  The caller missed; now, under one lock of the zone:
 * the entry may have landed meanwhile (HIT, pinned); the fetch this request
 * waited for may have failed (FAILED, its answer copied to the pool);
 * another request may be fetching (BUSY); otherwise this request owns the
 * key's fetch until now + timeout (OWNER), taking over a lock whose owner
 * missed its deadline, e.g. because its worker died.
 */

ngx_http_modelcache_lock_e
ngx_http_modelcache_zone_lock(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, ngx_msec_t timeout, ngx_pool_t *pool)
{
    time_t                       now;
    ngx_msec_t                   msec;
    ngx_http_modelcache_lock_t  *lk;
    ngx_http_modelcache_lock_e   rc;

    now = ngx_time();
    msec = ngx_current_msec;

    ngx_shmtx_lock(&zone->shpool->mutex);

    ctx->node = ngx_http_modelcache_zone_fresh_locked(zone, ctx, now);

    if (ctx->node) {
        rc = NGX_HTTP_MODELCACHE_LOCK_HIT;
        goto done;
    }

    lk = ngx_http_modelcache_zone_find_lock_locked(zone, ctx->key);

    if (lk && !lk->failed && (ngx_msec_int_t) (lk->deadline - msec) > 0
        && ngx_http_modelcache_zone_owner_alive(lk, msec))
    {
        ctx->lock_gen = lk->gen;

        /*
         * A bypass takes the answer of a refresh in flight (a burst of
         * refreshes is one) or of a fetch begun after it arrived; an
         * older fetch may predate what the client wants to see: it waits
         * for that one to end, then fetches.
         */
        if (ctx->bypass
            && (lk->bypass || (ngx_msec_int_t) (lk->started - ctx->arrived)
                              >= 0))
        {
            ctx->join_gen = lk->gen;
        }

        rc = NGX_HTTP_MODELCACHE_LOCK_BUSY;
        goto done;
    }

    if (lk && lk->failed && ctx->waited && lk->gen == ctx->lock_gen
        && (!ctx->bypass || lk->gen == ctx->join_gen)
        && lk->failed + NGX_HTTP_MODELCACHE_FAILED_KEEP > now)
    {
        /* no answer kept (status 0): each waiter fetches for itself */
        rc = (lk->status
              && ngx_http_modelcache_zone_failure_copy(lk, &ctx->failure,
                                                       pool)
                 == NGX_OK)
             ? NGX_HTTP_MODELCACHE_LOCK_FAILED
             : NGX_HTTP_MODELCACHE_LOCK_NONE;
        goto done;
    }

    if (lk == NULL) {
        lk = ngx_http_modelcache_zone_alloc_locked(zone,
                                          sizeof(ngx_http_modelcache_lock_t));
        if (lk == NULL) {
            rc = NGX_HTTP_MODELCACHE_LOCK_NONE;
            goto done;
        }

        ngx_memzero(lk, sizeof(ngx_http_modelcache_lock_t));
        ngx_memcpy(lk->key, ctx->key, NGX_HTTP_MODELCACHE_KEY_LEN);
        ngx_memcpy(&lk->node.key, ctx->key, sizeof(ngx_rbtree_key_t));
        ngx_rbtree_insert(&zone->sh->locks, &lk->node);

        rc = NGX_HTTP_MODELCACHE_LOCK_OWNER;

    } else if (lk->failed) {
        ngx_http_modelcache_zone_failure_free_locked(zone, lk);
        rc = NGX_HTTP_MODELCACHE_LOCK_OWNER;

    } else {
        rc = NGX_HTTP_MODELCACHE_LOCK_TAKEN;
    }

    lk->owner = ngx_pid;
    lk->deadline = msec + timeout;
    lk->started = msec;
    lk->checked = msec;
    lk->gen = ++zone->sh->fetch_seq;
    lk->bypass = ctx->bypass;

    ctx->lock_gen = lk->gen;
    ctx->lock_owner = 1;

done:

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return rc;
}


/*
 * The owner's fetch is over.  Success (failure NULL): the lock goes, the
 * waiters find the entry.  Failure: its answer stays for the waiters; one
 * we cannot keep (too large, no room) leaves status 0, and the waiters
 * fetch for themselves.
 */

void
ngx_http_modelcache_zone_unlock(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, ngx_http_modelcache_failure_t *failure)
{
    u_char                      *p;
    ngx_http_modelcache_lock_t  *lk;

    ctx->lock_owner = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    lk = ngx_http_modelcache_zone_find_lock_locked(zone, ctx->key);

    if (lk == NULL || lk->failed || lk->gen != ctx->lock_gen
        || lk->owner != ngx_pid)
    {
        /* taken over after our deadline: the new owner's now */
        goto done;
    }

    if (failure == NULL) {
        ngx_http_modelcache_zone_free_lock_locked(zone, lk);
        goto done;
    }

    lk->failed = ngx_time();
    ngx_queue_insert_head(&zone->sh->failed, &lk->queue);

    if (failure->status == 0
        || failure->body.len > NGX_HTTP_MODELCACHE_FAILED_MAX)
    {
        goto done;
    }

    p = ngx_slab_alloc_locked(zone->shpool,
                              failure->content_type.len + failure->body.len
                              + 1);
    if (p == NULL) {
        goto done;
    }

    lk->answer = p;
    lk->status = failure->status;
    lk->type_len = failure->content_type.len;
    lk->body_len = failure->body.len;

    p = ngx_http_modelcache_zone_copy(p, failure->content_type.data,
                                      failure->content_type.len);
    (void) ngx_http_modelcache_zone_copy(p, failure->body.data,
                                         failure->body.len);

done:

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


static ngx_int_t
ngx_http_modelcache_zone_failure_copy(ngx_http_modelcache_lock_t *lk,
    ngx_http_modelcache_failure_t *failure, ngx_pool_t *pool)
{
    u_char  *p;

    p = ngx_pnalloc(pool, lk->type_len + lk->body_len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, lk->answer, lk->type_len + lk->body_len);

    failure->status = lk->status;
    failure->content_type.data = p;
    failure->content_type.len = lk->type_len;
    failure->body.data = p + lk->type_len;
    failure->body.len = lk->body_len;

    return NGX_OK;
}


static void
ngx_http_modelcache_zone_failure_free_locked(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_lock_t *lk)
{
    ngx_queue_remove(&lk->queue);

    if (lk->answer) {
        ngx_slab_free_locked(zone->shpool, lk->answer);
    }

    lk->failed = 0;
    lk->status = 0;
    lk->answer = NULL;
}


static void
ngx_http_modelcache_zone_free_lock_locked(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_lock_t *lk)
{
    if (lk->failed) {
        ngx_http_modelcache_zone_failure_free_locked(zone, lk);
    }

    ngx_rbtree_delete(&zone->sh->locks, &lk->node);
    ngx_slab_free_locked(zone->shpool, lk);
}


/*
 * Failed fetches' answers only matter to their waiters, for a moment:
 * those that failed before "before" go, oldest first.
 */

static void
ngx_http_modelcache_zone_drop_failed_locked(ngx_http_modelcache_zone_t *zone,
    time_t before)
{
    ngx_queue_t                 *q;
    ngx_http_modelcache_lock_t  *lk;

    while (!ngx_queue_empty(&zone->sh->failed)) {
        q = ngx_queue_last(&zone->sh->failed);
        lk = ngx_queue_data(q, ngx_http_modelcache_lock_t, queue);

        if (lk->failed >= before) {
            return;
        }

        ngx_http_modelcache_zone_free_lock_locked(zone, lk);
    }
}


void
ngx_http_modelcache_zone_usage(ngx_http_modelcache_zone_t *zone,
    ngx_uint_t *entries, ngx_uint_t *derived, size_t *used)
{
    ngx_slab_pool_t  *shpool;

    shpool = zone->shpool;

    ngx_shmtx_lock(&shpool->mutex);

    *entries = zone->sh->entries;
    *derived = zone->sh->derived;
    *used = (size_t) (shpool->end - (u_char *) shpool)
            - shpool->pfree * ngx_pagesize;

    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * Evicts least recently used entries until the allocation fits: bounded by
 * the number of unpinned entries, as a large body may need many small
 * neighbours gone before enough contiguous pages are free.
 */

static void *
ngx_http_modelcache_zone_alloc(ngx_http_modelcache_zone_t *zone, size_t size)
{
    void  *p;

    ngx_shmtx_lock(&zone->shpool->mutex);

    p = ngx_http_modelcache_zone_alloc_locked(zone, size);

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return p;
}


static void *
ngx_http_modelcache_zone_alloc_locked(ngx_http_modelcache_zone_t *zone,
    size_t size)
{
    void    *p;
    time_t   now;

    now = ngx_time();

    ngx_http_modelcache_zone_collect_locked(zone);
    ngx_http_modelcache_zone_expire_locked(zone, now);
    ngx_http_modelcache_zone_drop_failed_locked(zone,
                                     now - NGX_HTTP_MODELCACHE_FAILED_KEEP + 1);

    p = ngx_slab_alloc_locked(zone->shpool, size);

    while (p == NULL
           && ngx_http_modelcache_zone_evict_locked(zone) == NGX_OK)
    {
        p = ngx_slab_alloc_locked(zone->shpool, size);
    }

    return p;
}


/* drops up to a few entries unread for "inactive", oldest first */

static void
ngx_http_modelcache_zone_expire_locked(ngx_http_modelcache_zone_t *zone,
    time_t now)
{
    ngx_uint_t                   n;
    ngx_queue_t                 *q, *prev;
    ngx_http_modelcache_node_t  *node;

    n = 0;

    for (q = ngx_queue_last(&zone->sh->lru);
         q != ngx_queue_sentinel(&zone->sh->lru) && n < 8;
         q = prev)
    {
        prev = ngx_queue_prev(q);
        node = ngx_queue_data(q, ngx_http_modelcache_node_t, queue);

        if (node->accessed + zone->inactive > now) {
            return;
        }

        if (ngx_http_modelcache_zone_pinned_locked(node)) {
            continue;
        }

        ngx_http_modelcache_zone_unlink_locked(zone, node);
        (void) ngx_atomic_fetch_add(&zone->sh->counters.evictions, 1);
        n++;

        /* its children may have been anywhere, "prev" too: from the end */
        prev = ngx_queue_last(&zone->sh->lru);
    }
}


/* the least recently used entry nobody is reading goes */

static ngx_int_t
ngx_http_modelcache_zone_evict_locked(ngx_http_modelcache_zone_t *zone)
{
    ngx_queue_t                 *q;
    ngx_http_modelcache_node_t  *node;

    for (q = ngx_queue_last(&zone->sh->lru);
         q != ngx_queue_sentinel(&zone->sh->lru);
         q = ngx_queue_prev(q))
    {
        node = ngx_queue_data(q, ngx_http_modelcache_node_t, queue);

        if (!ngx_http_modelcache_zone_pinned_locked(node)) {
            ngx_http_modelcache_zone_unlink_locked(zone, node);
            (void) ngx_atomic_fetch_add(&zone->sh->counters.evictions, 1);
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


/*
 * Out of the tree and the LRU; freed now, or, on the dead queue, by the
 * last unpin or once its readers' processes are gone.
 */

static void
ngx_http_modelcache_zone_unlink_locked(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_node_t *node)
{
    ngx_queue_t                 *q;
    ngx_http_modelcache_node_t  *child;

    ngx_rbtree_delete(&zone->sh->rbtree, &node->node);
    ngx_queue_remove(&node->queue);

    if (node->parent) {
        ngx_queue_remove(&node->sibling);
        node->parent->nchildren--;
        node->parent->children_size -= node->body_len;
        node->parent = NULL;
        zone->sh->derived--;

    } else {
        zone->sh->entries--;

        /* what was derived from a list goes with it */

        while (!ngx_queue_empty(&node->children)) {
            q = ngx_queue_head(&node->children);
            child = ngx_queue_data(q, ngx_http_modelcache_node_t, sibling);
            ngx_http_modelcache_zone_unlink_locked(zone, child);
        }
    }

    node->dead = 1;

    if (node->pins == 0) {
        ngx_slab_free_locked(zone->shpool, node);
        return;
    }

    ngx_queue_insert_tail(&zone->sh->dead, &node->queue);
}


static ngx_http_modelcache_node_t *
ngx_http_modelcache_zone_find_locked(ngx_http_modelcache_zone_t *zone,
    u_char *key)
{
    return (ngx_http_modelcache_node_t *)
               ngx_http_modelcache_zone_find_in(&zone->sh->rbtree, key);
}


/*
 * Both trees: _node_t and _lock_t start alike (node, queue, key), so one
 * walk, and one insert function, serve entries and locks.
 */

static ngx_rbtree_node_t *
ngx_http_modelcache_zone_find_in(ngx_rbtree_t *tree, u_char *key)
{
    ngx_int_t           rc;
    ngx_rbtree_key_t    hash;
    ngx_rbtree_node_t  *node, *sentinel;

    ngx_memcpy(&hash, key, sizeof(ngx_rbtree_key_t));

    node = tree->root;
    sentinel = tree->sentinel;

    while (node != sentinel) {

        if (hash != node->key) {
            node = (hash < node->key) ? node->left : node->right;
            continue;
        }

        rc = ngx_memcmp(key, ((ngx_http_modelcache_node_t *) node)->key,
                        NGX_HTTP_MODELCACHE_KEY_LEN);

        if (rc == 0) {
            return node;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/*
 * A fresh entry, pinned, or NULL; for a waiter, also the answer of the
 * fetch it waited for, however short its TTL (an entry stored at x.999 s
 * with a 1 s TTL is expired a moment later).  For a bypass, only the
 * answer of the fetch it joined or of one begun after it arrived.
 */

static ngx_http_modelcache_node_t *
ngx_http_modelcache_zone_fresh_locked(ngx_http_modelcache_zone_t *zone,
    ngx_http_modelcache_ctx_t *ctx, time_t now)
{
    ngx_http_modelcache_node_t  *node;

    node = ngx_http_modelcache_zone_find_locked(zone, ctx->key);

    if (node == NULL) {
        return NULL;
    }

    if (node->expires <= now
        && !(ctx->waited && node->gen && node->gen == ctx->lock_gen))
    {
        return NULL;
    }

    if (ctx->bypass
        && !(ctx->join_gen && node->gen == ctx->join_gen)
        && (ngx_msec_int_t) (node->started - ctx->arrived) < 0)
    {
        return NULL;
    }

    ngx_http_modelcache_zone_touch_locked(zone, node, now);
    ngx_http_modelcache_zone_pin_locked(node);

    return node;
}


static ngx_http_modelcache_lock_t *
ngx_http_modelcache_zone_find_lock_locked(ngx_http_modelcache_zone_t *zone,
    u_char *key)
{
    return (ngx_http_modelcache_lock_t *)
               ngx_http_modelcache_zone_find_in(&zone->sh->locks, key);
}


static void
ngx_http_modelcache_zone_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t  **p;

    for ( ;; ) {

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            p = (ngx_memcmp(((ngx_http_modelcache_node_t *) node)->key,
                            ((ngx_http_modelcache_node_t *) temp)->key,
                            NGX_HTTP_MODELCACHE_KEY_LEN)
                 < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}
