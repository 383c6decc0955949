
/*
 * ngx_http_modelcache_json: provider bodies.  jansson decides whether a
 * body is a model list; derived answers (lookup, filter, hide/show, merge)
 * are cut from the provider's own bytes, so every model object is answered
 * exactly as the provider wrote it (numbers, escapes, spacing), which a
 * jansson tree, printed again, would not do.  Runs in request memory,
 * outside the zone lock; nothing from jansson is kept beyond a call.
 */


#include "ngx_http_modelcache.h"

#include <jansson.h>


/* a member of a JSON object: key and value as bytes of the body */
typedef struct {
    u_char                          *key;          /* at its '"' */
    u_char                          *key_end;
    u_char                          *value;
    u_char                          *value_end;
} ngx_http_modelcache_json_member_t;


typedef struct {
    u_char                          *start;        /* the object's bytes */
    u_char                          *end;
    ngx_str_t                        id;           /* unescaped; or null */
    ngx_str_t                        id_raw;       /* as sent, quoted */
    ngx_str_t                        owned_by;
    time_t                           created;
    ngx_uint_t                       index;        /* in the merged list */
    ngx_uint_t                       members;
    u_char                          *cut;          /* its own "provider" */
    u_char                          *cut_end;
    u_char                          *cut_prev;
    ngx_str_t                       *label;
    unsigned                         has_created:1;
} ngx_http_modelcache_model_t;


/* the list being derived: models, and the envelope they came in */
typedef struct {
    ngx_array_t                      models;       /* _model_t */
    u_char                          *envelope;     /* first source's body */
    u_char                          *envelope_end;
    ngx_str_t                        field;        /* its list member */
    u_char                          *list_key;
    ngx_pool_t                      *pool;
    ngx_uint_t                       more;         /* more remain */
    unsigned                         paged:1;      /* limit or after */
    unsigned                         labelled:1;
} ngx_http_modelcache_list_t;


static ngx_int_t ngx_http_modelcache_json_reason(ngx_pool_t *pool,
    ngx_str_t *reason, const char *fmt, ...);
static u_char *ngx_http_modelcache_json_ws(u_char *p, u_char *end);
static u_char *ngx_http_modelcache_json_skip_string(u_char *p, u_char *end);
static u_char *ngx_http_modelcache_json_skip(u_char *p, u_char *end);
static ngx_int_t ngx_http_modelcache_json_member(u_char **pp, u_char *end,
    ngx_http_modelcache_json_member_t *m);
static ngx_int_t ngx_http_modelcache_json_string(ngx_pool_t *pool,
    u_char *p, u_char *end, ngx_str_t *s);
static ngx_uint_t ngx_http_modelcache_json_key_is(
    ngx_http_modelcache_json_member_t *m, const char *name, ngx_pool_t *pool);
static ngx_int_t ngx_http_modelcache_json_list_member(u_char *body,
    size_t len, ngx_str_t *field, ngx_pool_t *pool,
    ngx_http_modelcache_json_member_t *list);
static ngx_int_t ngx_http_modelcache_json_lookup(
    ngx_http_modelcache_list_t *l, ngx_http_modelcache_derive_t *d);
static ngx_int_t ngx_http_modelcache_json_read(
    ngx_http_modelcache_list_t *l, ngx_http_modelcache_answer_t *src,
    ngx_str_t *field);
static ngx_int_t ngx_http_modelcache_json_model(ngx_pool_t *pool,
    ngx_http_modelcache_model_t *model);
static ngx_int_t ngx_http_modelcache_json_time(u_char *p, size_t len,
    time_t *t);
static ngx_int_t ngx_http_modelcache_json_dedupe(
    ngx_http_modelcache_list_t *l);
static ngx_uint_t ngx_http_modelcache_json_rules(ngx_array_t *rules,
    ngx_str_t *id);
static ngx_uint_t ngx_http_modelcache_json_keep(
    ngx_http_modelcache_loc_conf_t *mlcf, ngx_http_modelcache_model_t *m);
static ngx_int_t ngx_http_modelcache_json_filter(
    ngx_http_modelcache_list_t *l, ngx_http_modelcache_derive_t *d);
static int ngx_libc_cdecl ngx_http_modelcache_json_cmp_id(const void *one,
    const void *two);
static int ngx_libc_cdecl ngx_http_modelcache_json_cmp_created(
    const void *one, const void *two);
static ngx_uint_t ngx_http_modelcache_json_contains(ngx_str_t *s,
    ngx_str_t *q);
static size_t ngx_http_modelcache_json_model_size(
    ngx_http_modelcache_model_t *m);
static u_char *ngx_http_modelcache_json_model_copy(u_char *p,
    ngx_http_modelcache_model_t *m);
static ngx_int_t ngx_http_modelcache_json_write(
    ngx_http_modelcache_list_t *l, ngx_str_t *out);
static u_char *ngx_http_modelcache_json_write_envelope(
    ngx_http_modelcache_list_t *l, u_char *p, u_char *list);
static void ngx_http_modelcache_json_more(ngx_http_modelcache_list_t *l,
    ngx_uint_t *set);
static u_char *ngx_http_modelcache_json_write_more(
    ngx_http_modelcache_list_t *l, u_char *p, ngx_uint_t which);
static u_char *ngx_http_modelcache_json_write_models(
    ngx_http_modelcache_list_t *l, u_char *p);


/* the members the module sets in a page's envelope */
#define NGX_HTTP_MODELCACHE_MORE_HAS       0
#define NGX_HTTP_MODELCACHE_MORE_FIRST     1
#define NGX_HTTP_MODELCACHE_MORE_LAST      2
#define NGX_HTTP_MODELCACHE_MORE_TOKEN     3
#define NGX_HTTP_MODELCACHE_MORE_N         4

/* what becomes of each in a page's envelope */
#define NGX_HTTP_MODELCACHE_MORE_KEEP      0     /* the provider's, if any */
#define NGX_HTTP_MODELCACHE_MORE_SET       1     /* ours */
#define NGX_HTTP_MODELCACHE_MORE_DONE      2     /* ours, written */
#define NGX_HTTP_MODELCACHE_MORE_DROP      3     /* none */

static const char  *ngx_http_modelcache_more_names[] = {
    "has_more", "first_id", "last_id", "nextPageToken"
};


/* the direction of the sort under way (ngx_qsort() passes no context) */
static ngx_int_t  ngx_http_modelcache_json_sort;


/*
 * A body is a model list when it is a JSON object holding an array under
 * "data" (OpenAI, Anthropic, LM Studio, OpenRouter) or "models" (Ollama,
 * Gemini), or under modelcache_list_field.  Otherwise NGX_DECLINED and
 * *reason says why, for the client's error body and the log.
 */

ngx_int_t
ngx_http_modelcache_json_validate(u_char *body, size_t len, ngx_str_t *field,
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

    if (field->len) {
        list = json_object_getn(root, (const char *) field->data,
                                field->len);

    } else {
        list = json_object_get(root, "data");
        if (list == NULL) {
            list = json_object_get(root, "models");
        }
    }

    if (list == NULL) {
        if (json_object_get(root, "error")) {
            rc = ngx_http_modelcache_json_reason(pool, reason,
                     "provider answered 200 with an error object");

        } else if (field->len) {
            rc = ngx_http_modelcache_json_reason(pool, reason,
                     "provider answered 200 without a model list "
                     "(no \"%V\" array)", field);

        } else {
            rc = ngx_http_modelcache_json_reason(pool, reason,
                     "provider answered 200 without a model list "
                     "(no \"data\" or \"models\" array)");
        }

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
 * The answer of a lookup, a filter, hide/show or a merge, made from the
 * sources (validated list bodies) in d->out, request memory.  NGX_DECLINED:
 * nothing found (404), d->param names what.
 */

ngx_int_t
ngx_http_modelcache_json_derive(ngx_http_modelcache_derive_t *d,
    ngx_pool_t *pool)
{
    ngx_int_t                        rc;
    ngx_uint_t                       i, n;
    ngx_http_modelcache_list_t       l;
    ngx_http_modelcache_model_t     *m;
    ngx_http_modelcache_loc_conf_t  *mlcf;

    mlcf = d->mlcf;

    ngx_memzero(&l, sizeof(ngx_http_modelcache_list_t));

    l.pool = pool;
    l.labelled = mlcf->labelled;

    if (ngx_array_init(&l.models, pool, 64,
                       sizeof(ngx_http_modelcache_model_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < d->nsources; i++) {
        if (ngx_http_modelcache_json_read(&l, &d->sources[i],
                                          &mlcf->list_field)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (l.labelled && ngx_http_modelcache_json_dedupe(&l) != NGX_OK) {
        return NGX_ERROR;
    }

    /* modelcache_hide and modelcache_show, for everything that follows */

    m = l.models.elts;
    n = 0;

    for (i = 0; i < l.models.nelts; i++) {
        if (ngx_http_modelcache_json_keep(mlcf, &m[i])) {
            m[n++] = m[i];
        }
    }

    l.models.nelts = n;

    if (d->lookup) {
        return ngx_http_modelcache_json_lookup(&l, d);
    }

    if (d->filter && d->filter->set) {
        rc = ngx_http_modelcache_json_filter(&l, d);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    return ngx_http_modelcache_json_write(&l, &d->out);
}


/*
 * modelcache_lookup: the first model whose identity is the value as given
 * or, when it holds '%', percent-decoded
 */

static ngx_int_t
ngx_http_modelcache_json_lookup(ngx_http_modelcache_list_t *l,
    ngx_http_modelcache_derive_t *d)
{
    u_char                       *dst, *src;
    ngx_str_t                     id;
    ngx_uint_t                    i;
    ngx_http_modelcache_model_t  *m;

    m = l->models.elts;
    id = *d->lookup;

    for ( ;; ) {
        for (i = 0; i < l->models.nelts; i++) {
            if (m[i].id.data && m[i].id.len == id.len
                && ngx_memcmp(m[i].id.data, id.data, id.len) == 0)
            {
                d->out.data = ngx_pnalloc(l->pool,
                                ngx_http_modelcache_json_model_size(&m[i]));
                if (d->out.data == NULL) {
                    return NGX_ERROR;
                }

                d->out.len = ngx_http_modelcache_json_model_copy(d->out.data,
                                                                 &m[i])
                             - d->out.data;
                return NGX_OK;
            }
        }

        if (id.data != d->lookup->data
            || ngx_strlchr(id.data, id.data + id.len, '%') == NULL)
        {
            d->param = "model";
            return NGX_DECLINED;
        }

        id.data = ngx_pnalloc(l->pool, d->lookup->len);
        if (id.data == NULL) {
            return NGX_ERROR;
        }

        dst = id.data;
        src = d->lookup->data;
        ngx_unescape_uri(&dst, &src, d->lookup->len, 0);
        id.len = dst - id.data;
    }
}


/* a source's models, appended to the list */

static ngx_int_t
ngx_http_modelcache_json_read(ngx_http_modelcache_list_t *l,
    ngx_http_modelcache_answer_t *src, ngx_str_t *field)
{
    u_char                             *p, *end;
    ngx_http_modelcache_model_t        *model;
    ngx_http_modelcache_json_member_t   list;

    if (ngx_http_modelcache_json_list_member(src->body, src->len, field,
                                             l->pool, &list)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (l->envelope == NULL) {
        l->envelope = src->body;
        l->envelope_end = src->body + src->len;
        l->list_key = list.key;

        if (ngx_http_modelcache_json_string(l->pool, list.key, list.key_end,
                                            &l->field)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    /* the array: "[" ws value (ws "," ws value)* ws "]" */

    p = list.value + 1;
    end = list.value_end;

    for ( ;; ) {
        p = ngx_http_modelcache_json_ws(p, end);

        if (p == end || *p == ']') {
            return NGX_OK;
        }

        if (*p == ',') {
            p = ngx_http_modelcache_json_ws(p + 1, end);
        }

        model = ngx_array_push(&l->models);
        if (model == NULL) {
            return NGX_ERROR;
        }

        ngx_memzero(model, sizeof(ngx_http_modelcache_model_t));

        model->start = p;
        model->end = ngx_http_modelcache_json_skip(p, end);
        model->label = l->labelled ? &src->label : NULL;
        model->index = l->models.nelts - 1;

        /* an empty value: not JSON after all; never loop on it */
        if (model->end == NULL || model->end == p) {
            return NGX_ERROR;
        }

        if (*p == '{'
            && ngx_http_modelcache_json_model(l->pool, model) != NGX_OK)
        {
            return NGX_ERROR;
        }

        p = model->end;
    }
}


/*
 * The list member of a validated body: "data", else "models", or the
 * modelcache_list_field one; the last of equal keys, as jansson has it.
 */

static ngx_int_t
ngx_http_modelcache_json_list_member(u_char *body, size_t len,
    ngx_str_t *field, ngx_pool_t *pool,
    ngx_http_modelcache_json_member_t *list)
{
    u_char                             *p, *end;
    ngx_int_t                           rc;
    ngx_uint_t                          found;
    ngx_str_t                           key;
    ngx_http_modelcache_json_member_t   m;

    ngx_memzero(list, sizeof(ngx_http_modelcache_json_member_t));

    end = body + len;
    p = ngx_http_modelcache_json_ws(body, end);

    if (p == end || *p != '{') {
        return NGX_ERROR;
    }

    p++;
    found = 0;

    for ( ;; ) {
        rc = ngx_http_modelcache_json_member(&p, end, &m);

        if (rc == NGX_DONE) {
            break;
        }

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }

        if (ngx_http_modelcache_json_string(pool, m.key, m.key_end, &key)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        if (field->len) {
            if (key.len == field->len
                && ngx_memcmp(key.data, field->data, key.len) == 0)
            {
                *list = m;
                found = 2;
            }

            continue;
        }

        if (key.len == 4 && ngx_memcmp(key.data, "data", 4) == 0) {
            *list = m;
            found = 2;

        } else if (found < 2 && key.len == 6
                   && ngx_memcmp(key.data, "models", 6) == 0)
        {
            *list = m;
            found = 1;
        }
    }

    if (!found || *list->value != '[') {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* what the module reads of one model object: identity, owner, creation */

static ngx_int_t
ngx_http_modelcache_json_model(ngx_pool_t *pool,
    ngx_http_modelcache_model_t *model)
{
    u_char                             *p, *prev_end;
    ngx_int_t                           rc, n;
    ngx_str_t                           name, s;
    ngx_http_modelcache_json_member_t   m;

    ngx_str_null(&name);
    p = model->start + 1;
    prev_end = NULL;

    for ( ;; ) {
        rc = ngx_http_modelcache_json_member(&p, model->end, &m);

        if (rc == NGX_DONE) {
            break;
        }

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }

        model->members++;

        if (model->cut && model->cut_end == NULL) {
            /* its own "provider" was followed by this member */
            model->cut_end = m.key;
        }

        if (*m.value == '"') {

            if (ngx_http_modelcache_json_key_is(&m, "id", pool)) {
                if (ngx_http_modelcache_json_string(pool, m.value,
                                                    m.value_end, &model->id)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

                model->id_raw.data = m.value;
                model->id_raw.len = m.value_end - m.value;

            } else if (name.data == NULL
                       && ngx_http_modelcache_json_key_is(&m, "name", pool))
            {
                if (ngx_http_modelcache_json_string(pool, m.value,
                                                    m.value_end, &name)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

                s.data = m.value;
                s.len = m.value_end - m.value;

                if (model->id.data == NULL) {
                    model->id_raw = s;
                }

            } else if (ngx_http_modelcache_json_key_is(&m, "owned_by", pool)) {
                if (ngx_http_modelcache_json_string(pool, m.value,
                                                    m.value_end,
                                                    &model->owned_by)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

            } else if (!model->has_created
                       && (ngx_http_modelcache_json_key_is(&m, "created_at",
                                                           pool)
                           || ngx_http_modelcache_json_key_is(&m,
                                                   "modified_at", pool))
                       && ngx_http_modelcache_json_time(m.value + 1,
                                              m.value_end - m.value - 2,
                                              &model->created)
                          == NGX_OK)
            {
                model->has_created = 1;
            }

        } else if (ngx_http_modelcache_json_key_is(&m, "created", pool)) {
            n = ngx_atotm(m.value, m.value_end - m.value);

            if (n != NGX_ERROR) {
                model->created = n;
                model->has_created = 1;
            }
        }

        if (model->label && ngx_http_modelcache_json_key_is(&m, "provider",
                                                            pool))
        {
            /* cut with the comma after it, or before it if it is last */
            model->cut = m.key;
            model->cut_end = NULL;
            model->cut_prev = prev_end;
        }

        prev_end = m.value_end;
    }

    if (model->id.data == NULL && name.data) {
        model->id = name;
    }

    if (model->cut && model->cut_end == NULL) {
        model->cut = model->cut_prev;
        model->cut_end = prev_end;
    }

    return NGX_OK;
}


/* hide/show: whether a model stays */

static ngx_uint_t
ngx_http_modelcache_json_keep(ngx_http_modelcache_loc_conf_t *mlcf,
    ngx_http_modelcache_model_t *m)
{
    if (mlcf->show) {
        if (m->id.data == NULL
            || !ngx_http_modelcache_json_rules(mlcf->show, &m->id))
        {
            return 0;
        }
    }

    if (mlcf->hide && m->id.data
        && ngx_http_modelcache_json_rules(mlcf->hide, &m->id))
    {
        return 0;
    }

    return 1;
}


static ngx_uint_t
ngx_http_modelcache_json_rules(ngx_array_t *rules, ngx_str_t *id)
{
    ngx_uint_t                   i;
    ngx_http_modelcache_rule_t  *rule;

    rule = rules->elts;

    for (i = 0; i < rules->nelts; i++) {
        if (ngx_regex_exec(rule[i].regex, id, NULL, 0) >= 0) {
            return 1;
        }
    }

    return 0;
}


/* a merged list keeps the first model of each identity */

static ngx_int_t
ngx_http_modelcache_json_dedupe(ngx_http_modelcache_list_t *l)
{
    ngx_uint_t                    i, j, n, k, size, *table;
    ngx_http_modelcache_model_t  *m;

    m = l->models.elts;
    n = l->models.nelts;

    for (size = 16; size < 2 * n; size *= 2) { /* void */ }

    table = ngx_pcalloc(l->pool, size * sizeof(ngx_uint_t));
    if (table == NULL) {
        return NGX_ERROR;
    }

    k = 0;

    for (i = 0; i < n; i++) {

        if (m[i].id.data == NULL) {
            m[k++] = m[i];
            continue;
        }

        /* table[]: 1 + the index in m[] of a kept model, 0: empty */

        for (j = ngx_hash_key(m[i].id.data, m[i].id.len) & (size - 1);
             table[j];
             j = (j + 1) & (size - 1))
        {
            if (m[table[j] - 1].id.len == m[i].id.len
                && ngx_memcmp(m[table[j] - 1].id.data, m[i].id.data,
                              m[i].id.len)
                   == 0)
            {
                break;
            }
        }

        if (table[j]) {
            continue;
        }

        m[k] = m[i];
        table[j] = ++k;
    }

    l->models.nelts = k;

    return NGX_OK;
}


/* q, owned_by, sort, after, limit, in that order */

static ngx_int_t
ngx_http_modelcache_json_filter(ngx_http_modelcache_list_t *l,
    ngx_http_modelcache_derive_t *d)
{
    ngx_uint_t                     i, n, start, count;
    const char                    *param;
    ngx_http_modelcache_model_t   *m;
    ngx_http_modelcache_filter_t  *f;

    f = d->filter;
    m = l->models.elts;
    n = 0;

    for (i = 0; i < l->models.nelts; i++) {

        if (f->q.len && !ngx_http_modelcache_json_contains(&m[i].id, &f->q)) {
            continue;
        }

        if (f->owned_by.len
            && (m[i].owned_by.data == NULL
                || m[i].owned_by.len != f->owned_by.len
                || ngx_memcmp(m[i].owned_by.data, f->owned_by.data,
                              f->owned_by.len)
                   != 0))
        {
            continue;
        }

        m[i].index = n;
        m[n++] = m[i];
    }

    param = f->owned_by.len ? "owned_by" : (f->q.len ? "q" : NULL);

    if (n == 0 && param) {
        d->param = param;
        return NGX_DECLINED;
    }

    l->models.nelts = n;

    if (f->sort) {
        ngx_http_modelcache_json_sort = f->sort;

        ngx_qsort(m, n, sizeof(ngx_http_modelcache_model_t),
                  (f->sort == NGX_HTTP_MODELCACHE_SORT_ID
                   || f->sort == -NGX_HTTP_MODELCACHE_SORT_ID)
                  ? ngx_http_modelcache_json_cmp_id
                  : ngx_http_modelcache_json_cmp_created);
    }

    start = 0;

    if (f->after.len) {
        for (i = 0; i < n; i++) {
            if (m[i].id.data && m[i].id.len == f->after.len
                && ngx_memcmp(m[i].id.data, f->after.data, f->after.len) == 0)
            {
                break;
            }
        }

        if (i + 1 >= n) {
            /* not there, or nothing after it */
            d->param = "after";
            return NGX_DECLINED;
        }

        start = i + 1;
    }

    count = n - start;

    if (f->limit && f->limit < count) {
        count = f->limit;
    }

    if (f->limit || f->after.len) {
        l->paged = 1;
        l->more = (start + count < n);
    }

    if (start) {
        ngx_memmove(m, m + start,
                    count * sizeof(ngx_http_modelcache_model_t));
    }

    l->models.nelts = count;

    return NGX_OK;
}


/* ties keep the list's order: the index decides */

static int ngx_libc_cdecl
ngx_http_modelcache_json_cmp_id(const void *one, const void *two)
{
    int                           rc;
    size_t                        len;
    ngx_http_modelcache_model_t  *a, *b;

    a = (ngx_http_modelcache_model_t *) one;
    b = (ngx_http_modelcache_model_t *) two;

    len = ngx_min(a->id.len, b->id.len);
    rc = len ? ngx_memcmp(a->id.data, b->id.data, len) : 0;

    if (rc == 0) {
        rc = (a->id.len > b->id.len) - (a->id.len < b->id.len);
    }

    if (ngx_http_modelcache_json_sort < 0) {
        rc = -rc;
    }

    if (rc == 0) {
        rc = (a->index > b->index) - (a->index < b->index);
    }

    return rc;
}


/* models without a creation time go last, whichever the direction */

static int ngx_libc_cdecl
ngx_http_modelcache_json_cmp_created(const void *one, const void *two)
{
    int                           rc;
    ngx_http_modelcache_model_t  *a, *b;

    a = (ngx_http_modelcache_model_t *) one;
    b = (ngx_http_modelcache_model_t *) two;

    if (a->has_created != b->has_created) {
        return a->has_created ? -1 : 1;
    }

    rc = (a->created > b->created) - (a->created < b->created);

    if (ngx_http_modelcache_json_sort < 0) {
        rc = -rc;
    }

    if (rc == 0) {
        rc = (a->index > b->index) - (a->index < b->index);
    }

    return rc;
}


/* q: a substring of the identity, ASCII letters in any case */

static ngx_uint_t
ngx_http_modelcache_json_contains(ngx_str_t *s, ngx_str_t *q)
{
    size_t  i, j;

    if (s->data == NULL || q->len > s->len) {
        return 0;
    }

    for (i = 0; i + q->len <= s->len; i++) {

        for (j = 0; j < q->len; j++) {
            if (ngx_tolower(s->data[i + j]) != ngx_tolower(q->data[j])) {
                break;
            }
        }

        if (j == q->len) {
            return 1;
        }
    }

    return 0;
}


/* a model object as answered: the provider's bytes, a merge's label first */

static size_t
ngx_http_modelcache_json_model_size(ngx_http_modelcache_model_t *m)
{
    size_t  len;

    if (m->label == NULL || *m->start != '{') {
        return m->end - m->start;
    }

    len = sizeof("{\"provider\":\"\"}") - 1 + m->label->len;

    if (m->members - (m->cut ? 1 : 0) == 0) {
        return len;
    }

    /* its members follow a comma instead of the '}' */
    len += m->end - m->start - 1;

    if (m->cut) {
        len -= m->cut_end - m->cut;
    }

    return len;
}


static u_char *
ngx_http_modelcache_json_model_copy(u_char *p, ngx_http_modelcache_model_t *m)
{
    if (m->label == NULL || *m->start != '{') {
        return ngx_cpymem(p, m->start, m->end - m->start);
    }

    p = ngx_cpymem(p, "{\"provider\":\"", sizeof("{\"provider\":\"") - 1);
    p = ngx_cpymem(p, m->label->data, m->label->len);

    if (m->members - (m->cut ? 1 : 0) == 0) {
        return ngx_cpymem(p, "\"}", 2);
    }

    p = ngx_cpymem(p, "\",", 2);

    if (m->cut == NULL) {
        return ngx_cpymem(p, m->start + 1, m->end - m->start - 1);
    }

    p = ngx_cpymem(p, m->start + 1, m->cut - m->start - 1);

    return ngx_cpymem(p, m->cut_end, m->end - m->cut_end);
}


/*
 * The list as answered: a merge in OpenAI's envelope; otherwise the
 * provider's envelope, its members as sent, the list rebuilt and, for a
 * page (limit, after), whether more remain.
 */

static ngx_int_t
ngx_http_modelcache_json_write(ngx_http_modelcache_list_t *l, ngx_str_t *out)
{
    u_char                       *p;
    size_t                        len;
    ngx_uint_t                    i;
    ngx_http_modelcache_model_t  *m;

    m = l->models.elts;

    len = sizeof("{\"object\":\"list\",\"data\":[]}") - 1
          + (l->envelope_end - l->envelope)
          + sizeof(",\"has_more\":false,\"first_id\":null,"
                   "\"last_id\":null") - 1
          + sizeof(",\"nextPageToken\":") - 1;

    for (i = 0; i < l->models.nelts; i++) {
        len += ngx_http_modelcache_json_model_size(&m[i]) + 1;

        if (i == 0 || i + 1 == l->models.nelts) {
            len += m[i].id_raw.len + sizeof("null");
        }
    }

    out->data = ngx_pnalloc(l->pool, len);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    p = out->data;

    if (l->labelled) {
        p = ngx_cpymem(p, "{\"object\":\"list\",\"data\":",
                       sizeof("{\"object\":\"list\",\"data\":") - 1);
        p = ngx_http_modelcache_json_write_models(l, p);

        if (l->paged) {
            for (i = 0; i < NGX_HTTP_MODELCACHE_MORE_TOKEN; i++) {
                *p++ = ',';
                p = ngx_http_modelcache_json_write_more(l, p, i);
            }
        }

        *p++ = '}';

    } else {
        p = ngx_http_modelcache_json_write_envelope(l, p, l->list_key);
    }

    out->len = p - out->data;

    return NGX_OK;
}


static u_char *
ngx_http_modelcache_json_write_envelope(ngx_http_modelcache_list_t *l,
    u_char *p, u_char *list)
{
    u_char                             *q;
    ngx_str_t                           key;
    ngx_uint_t                          i, first;
    ngx_uint_t                          set[NGX_HTTP_MODELCACHE_MORE_N];
    ngx_http_modelcache_json_member_t   m;

    ngx_http_modelcache_json_more(l, set);

    *p++ = '{';
    first = 1;

    q = ngx_http_modelcache_json_ws(l->envelope, l->envelope_end) + 1;

    while (ngx_http_modelcache_json_member(&q, l->envelope_end, &m)
           == NGX_OK)
    {
        i = NGX_HTTP_MODELCACHE_MORE_N;

        if (l->paged && m.key != list
            && ngx_http_modelcache_json_string(l->pool, m.key, m.key_end,
                                               &key)
               == NGX_OK)
        {
            for (i = 0; i < NGX_HTTP_MODELCACHE_MORE_N; i++) {
                if (ngx_strlen(ngx_http_modelcache_more_names[i]) == key.len
                    && ngx_memcmp(ngx_http_modelcache_more_names[i],
                                  key.data, key.len) == 0)
                {
                    break;
                }
            }
        }

        /* ours replaces the provider's member, once; or it goes */
        if (i < NGX_HTTP_MODELCACHE_MORE_N
            && set[i] != NGX_HTTP_MODELCACHE_MORE_KEEP
            && (set[i] == NGX_HTTP_MODELCACHE_MORE_DROP
                || set[i] == NGX_HTTP_MODELCACHE_MORE_DONE))
        {
            continue;
        }

        if (!first) {
            *p++ = ',';
        }

        first = 0;

        if (i < NGX_HTTP_MODELCACHE_MORE_N
            && set[i] == NGX_HTTP_MODELCACHE_MORE_SET)
        {
            p = ngx_http_modelcache_json_write_more(l, p, i);
            set[i] = NGX_HTTP_MODELCACHE_MORE_DONE;
            continue;
        }

        p = ngx_cpymem(p, m.key, m.key_end - m.key);
        *p++ = ':';

        if (m.key == list) {
            p = ngx_http_modelcache_json_write_models(l, p);

        } else {
            p = ngx_cpymem(p, m.value, m.value_end - m.value);
        }
    }

    for (i = 0; i < NGX_HTTP_MODELCACHE_MORE_N; i++) {
        if (set[i] == NGX_HTTP_MODELCACHE_MORE_SET) {
            if (!first) {
                *p++ = ',';
            }

            first = 0;
            p = ngx_http_modelcache_json_write_more(l, p, i);
        }
    }

    *p++ = '}';

    return p;
}


/*
 * For a page (limit, after): a "data" envelope gets has_more, first_id and
 * last_id, others nextPageToken while more remain; not a page: all as sent.
 */

static void
ngx_http_modelcache_json_more(ngx_http_modelcache_list_t *l, ngx_uint_t *set)
{
    ngx_uint_t  i, data;

    for (i = 0; i < NGX_HTTP_MODELCACHE_MORE_N; i++) {
        set[i] = NGX_HTTP_MODELCACHE_MORE_KEEP;
    }

    if (!l->paged) {
        return;
    }

    data = l->labelled
           || (l->field.len == 4 && ngx_memcmp(l->field.data, "data", 4) == 0);

    if (data) {
        set[NGX_HTTP_MODELCACHE_MORE_HAS] = NGX_HTTP_MODELCACHE_MORE_SET;
        set[NGX_HTTP_MODELCACHE_MORE_FIRST] = NGX_HTTP_MODELCACHE_MORE_SET;
        set[NGX_HTTP_MODELCACHE_MORE_LAST] = NGX_HTTP_MODELCACHE_MORE_SET;

    } else {
        set[NGX_HTTP_MODELCACHE_MORE_TOKEN] = l->more
                                              ? NGX_HTTP_MODELCACHE_MORE_SET
                                              : NGX_HTTP_MODELCACHE_MORE_DROP;
    }
}


/* "name":value of one of the members a page reports */

static u_char *
ngx_http_modelcache_json_write_more(ngx_http_modelcache_list_t *l, u_char *p,
    ngx_uint_t which)
{
    ngx_uint_t                    n;
    ngx_http_modelcache_model_t  *m;

    m = l->models.elts;
    n = l->models.nelts;

    *p++ = '"';
    p = ngx_cpymem(p, ngx_http_modelcache_more_names[which],
                   ngx_strlen(ngx_http_modelcache_more_names[which]));
    *p++ = '"';
    *p++ = ':';

    switch (which) {

    case NGX_HTTP_MODELCACHE_MORE_HAS:
        return l->more ? ngx_cpymem(p, "true", 4) : ngx_cpymem(p, "false", 5);

    case NGX_HTTP_MODELCACHE_MORE_FIRST:
        m = n ? &m[0] : NULL;
        break;

    default: /* LAST, TOKEN */
        m = n ? &m[n - 1] : NULL;
        break;
    }

    if (m == NULL || m->id_raw.len == 0) {
        return ngx_cpymem(p, "null", 4);
    }

    return ngx_cpymem(p, m->id_raw.data, m->id_raw.len);
}


static u_char *
ngx_http_modelcache_json_write_models(ngx_http_modelcache_list_t *l,
    u_char *p)
{
    ngx_uint_t                    i;
    ngx_http_modelcache_model_t  *m;

    m = l->models.elts;

    *p++ = '[';

    for (i = 0; i < l->models.nelts; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_http_modelcache_json_model_copy(p, &m[i]);
    }

    *p++ = ']';

    return p;
}


/* the bytes of a validated body: whitespace, strings, values, members */

static u_char *
ngx_http_modelcache_json_ws(u_char *p, u_char *end)
{
    while (p < end
           && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
    {
        p++;
    }

    return p;
}


/* p at the opening '"'; returns past the closing one, or NULL */

static u_char *
ngx_http_modelcache_json_skip_string(u_char *p, u_char *end)
{
    for (p++; p < end; p++) {

        if (*p == '\\') {
            p++;
            continue;
        }

        if (*p == '"') {
            return p + 1;
        }
    }

    return NULL;
}


/*
 * Past one value.  The body was validated, so brackets pair up and a depth
 * count is enough: no recursion, whatever the nesting.
 */

static u_char *
ngx_http_modelcache_json_skip(u_char *p, u_char *end)
{
    size_t  depth;

    if (p >= end) {
        return NULL;
    }

    if (*p == '"') {
        return ngx_http_modelcache_json_skip_string(p, end);
    }

    if (*p != '{' && *p != '[') {
        while (p < end && *p != ',' && *p != '}' && *p != ']'
               && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
        {
            p++;
        }

        return p;
    }

    depth = 0;

    while (p < end) {

        switch (*p) {

        case '"':
            p = ngx_http_modelcache_json_skip_string(p, end);
            if (p == NULL) {
                return NULL;
            }

            continue;

        case '{':
        case '[':
            depth++;
            break;

        case '}':
        case ']':
            if (--depth == 0) {
                return p + 1;
            }

            break;
        }

        p++;
    }

    return NULL;
}


/*
 * The next member of an object, *pp past its '{' or a previous member:
 * NGX_OK, NGX_DONE at its '}', NGX_ERROR if the bytes say otherwise.
 */

static ngx_int_t
ngx_http_modelcache_json_member(u_char **pp, u_char *end,
    ngx_http_modelcache_json_member_t *m)
{
    u_char  *p;

    p = ngx_http_modelcache_json_ws(*pp, end);

    if (p < end && *p == ',') {
        p = ngx_http_modelcache_json_ws(p + 1, end);
    }

    if (p >= end) {
        return NGX_ERROR;
    }

    if (*p == '}') {
        *pp = p + 1;
        return NGX_DONE;
    }

    if (*p != '"') {
        return NGX_ERROR;
    }

    m->key = p;
    m->key_end = ngx_http_modelcache_json_skip_string(p, end);

    if (m->key_end == NULL) {
        return NGX_ERROR;
    }

    p = ngx_http_modelcache_json_ws(m->key_end, end);

    if (p >= end || *p != ':') {
        return NGX_ERROR;
    }

    m->value = ngx_http_modelcache_json_ws(p + 1, end);
    m->value_end = ngx_http_modelcache_json_skip(m->value, end);

    if (m->value_end == NULL || m->value_end == m->value) {
        return NGX_ERROR;
    }

    *pp = m->value_end;

    return NGX_OK;
}


/*
 * A string's value: its bytes when it has no escapes (most), else what
 * jansson makes of it ("o\u0033" is "o3").
 */

static ngx_int_t
ngx_http_modelcache_json_string(ngx_pool_t *pool, u_char *p, u_char *end,
    ngx_str_t *s)
{
    json_t  *v;

    if (end - p < 2) {
        return NGX_ERROR;
    }

    if (ngx_strlchr(p + 1, end - 1, '\\') == NULL) {
        s->data = p + 1;
        s->len = end - p - 2;
        return NGX_OK;
    }

    v = json_loadb((const char *) p, end - p, JSON_DECODE_ANY, NULL);

    if (v == NULL || !json_is_string(v)) {
        json_decref(v);
        return NGX_ERROR;
    }

    s->len = json_string_length(v);
    s->data = ngx_pnalloc(pool, s->len + 1);

    if (s->data) {
        ngx_memcpy(s->data, json_string_value(v), s->len);
    }

    json_decref(v);

    return s->data ? NGX_OK : NGX_ERROR;
}


static ngx_uint_t
ngx_http_modelcache_json_key_is(ngx_http_modelcache_json_member_t *m,
    const char *name, ngx_pool_t *pool)
{
    size_t     len;
    ngx_str_t  key;

    len = ngx_strlen(name);

    /* the common case, a key without escapes, compared in place */
    if ((size_t) (m->key_end - m->key) == len + 2
        && ngx_memcmp(m->key + 1, name, len) == 0)
    {
        return 1;
    }

    if (ngx_strlchr(m->key, m->key_end, '\\') == NULL
        || ngx_http_modelcache_json_string(pool, m->key, m->key_end, &key)
           != NGX_OK)
    {
        return 0;
    }

    return key.len == len && ngx_memcmp(key.data, name, len) == 0;
}


/*
 * RFC 3339, "2024-10-22T00:00:00Z" or with a fraction and an offset, to
 * seconds since the epoch; the fraction does not count
 */

static ngx_int_t
ngx_http_modelcache_json_time(u_char *p, size_t len, time_t *t)
{
    u_char     *end;
    time_t      days, off;
    ngx_int_t   y, mon, d, h, min, sec;
    ngx_uint_t  i;

    static const u_char  digits[] = { 0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15,
                                      17, 18 };

    if (len < 20) {
        return NGX_ERROR;
    }

    for (i = 0; i < sizeof(digits); i++) {
        if (p[digits[i]] < '0' || p[digits[i]] > '9') {
            return NGX_ERROR;
        }
    }

    if (p[4] != '-' || p[7] != '-' || p[13] != ':' || p[16] != ':'
        || (p[10] != 'T' && p[10] != 't' && p[10] != ' '))
    {
        return NGX_ERROR;
    }

    y = ngx_atoi(p, 4);
    mon = ngx_atoi(p + 5, 2);
    d = ngx_atoi(p + 8, 2);
    h = ngx_atoi(p + 11, 2);
    min = ngx_atoi(p + 14, 2);
    sec = ngx_atoi(p + 17, 2);

    if (mon < 1 || mon > 12 || d < 1 || d > 31 || h > 23 || min > 59
        || sec > 60)
    {
        return NGX_ERROR;
    }

    end = p + len;
    p += 19;

    if (*p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++) { /* void */ }
    }

    if (end - p == 1 && (*p == 'Z' || *p == 'z')) {
        off = 0;

    } else if (end - p == 6 && (*p == '+' || *p == '-') && p[3] == ':'
               && ngx_atoi(p + 1, 2) != NGX_ERROR
               && ngx_atoi(p + 4, 2) != NGX_ERROR)
    {
        off = ngx_atoi(p + 1, 2) * 3600 + ngx_atoi(p + 4, 2) * 60;

        if (*p == '-') {
            off = -off;
        }

    } else {
        return NGX_ERROR;
    }

    /* days since 1970-01-01 of the proleptic Gregorian calendar */

    y -= (mon <= 2);
    days = (time_t) y * 365 + y / 4 - y / 100 + y / 400
           + (153 * (mon + (mon > 2 ? -3 : 9)) + 2) / 5 + d - 1
           - 719468;

    *t = days * 86400 + h * 3600 + min * 60 + sec - off;

    return NGX_OK;
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
