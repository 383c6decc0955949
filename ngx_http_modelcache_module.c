
/*
 * ngx_http_modelcache_module: the module, its directives, configuration
 * create/merge and postconfiguration.  The work itself is in src/.
 */


#include "src/ngx_http_modelcache.h"


static void *ngx_http_modelcache_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_modelcache_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_modelcache_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_modelcache_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_modelcache_init(ngx_conf_t *cf);
static void ngx_http_modelcache_exit_process(ngx_cycle_t *cycle);

static char *ngx_http_modelcache_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache_pass(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache_credentials(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_modelcache_bypass(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache_rule(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache_list_field(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_modelcache_admin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_modelcache_ttl_check(ngx_conf_t *cf, void *post,
    void *data);

static ngx_shm_zone_t *ngx_http_modelcache_zone_ref(ngx_conf_t *cf,
    ngx_str_t *name);
static ngx_int_t ngx_http_modelcache_set_handler(ngx_conf_t *cf,
    ngx_http_handler_pt handler);
static char *ngx_http_modelcache_merge_passes(ngx_conf_t *cf,
    ngx_http_modelcache_loc_conf_t *conf);
static char *ngx_http_modelcache_merge_transform(ngx_conf_t *cf,
    ngx_http_modelcache_loc_conf_t *conf);
static ngx_array_t *ngx_http_modelcache_compile_values(ngx_conf_t *cf,
    ngx_str_t *values, ngx_uint_t n);


static ngx_conf_post_handler_pt  ngx_http_modelcache_ttl_post =
    ngx_http_modelcache_ttl_check;


static ngx_str_t  ngx_http_modelcache_default_credentials[] = {
    ngx_string("$http_authorization"),
    ngx_string("$http_x_api_key"),
    ngx_string("$http_api_key"),
    ngx_string("$http_x_goog_api_key")
};


static ngx_command_t  ngx_http_modelcache_commands[] = {

    { ngx_string("modelcache_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_modelcache_zone,
      0,
      0,
      NULL },

    { ngx_string("modelcache"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("modelcache_pass"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_modelcache_pass,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("modelcache_lookup"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, lookup),
      NULL },

    { ngx_string("modelcache_filter"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, filter),
      NULL },

    { ngx_string("modelcache_hide"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache_rule,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, hide),
      NULL },

    { ngx_string("modelcache_show"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache_rule,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, show),
      NULL },

    { ngx_string("modelcache_list_field"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache_list_field,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("modelcache_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, ttl),
      &ngx_http_modelcache_ttl_post },

    { ngx_string("modelcache_scope"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, scope),
      NULL },

    { ngx_string("modelcache_credentials"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_modelcache_credentials,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("modelcache_bypass"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_modelcache_bypass,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("modelcache_status_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, status_header),
      NULL },

    { ngx_string("modelcache_lock_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, lock_timeout),
      NULL },

    { ngx_string("modelcache_stale_while_revalidate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, stale_while_revalidate),
      NULL },

    { ngx_string("modelcache_stale_if_error"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, stale_if_error),
      NULL },

    { ngx_string("modelcache_purge"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache_admin,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, purge_zone),
      ngx_http_modelcache_purge_handler },

    { ngx_string("modelcache_stats"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_modelcache_admin,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_modelcache_loc_conf_t, stats_zone),
      ngx_http_modelcache_stats_handler },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_modelcache_module_ctx = {
    ngx_http_modelcache_add_variables,     /* preconfiguration */
    ngx_http_modelcache_init,              /* postconfiguration */

    ngx_http_modelcache_create_main_conf,  /* create main configuration */
    ngx_http_modelcache_init_main_conf,    /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_modelcache_create_loc_conf,   /* create location configuration */
    ngx_http_modelcache_merge_loc_conf     /* merge location configuration */
};


ngx_module_t  ngx_http_modelcache_module = {
    NGX_MODULE_V1,
    &ngx_http_modelcache_module_ctx,       /* module context */
    ngx_http_modelcache_commands,          /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_modelcache_exit_process,      /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static void *
ngx_http_modelcache_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_modelcache_main_conf_t  *mmcf;

    mmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_modelcache_main_conf_t));
    if (mmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     mmcf->credentials = NULL;
     */

    if (ngx_array_init(&mmcf->zone_refs, cf->pool, 4,
                       sizeof(ngx_http_modelcache_zone_ref_t))
        != NGX_OK)
    {
        return NULL;
    }

    return mmcf;
}


static char *
ngx_http_modelcache_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_modelcache_main_conf_t *mmcf = conf;

    mmcf->credentials = ngx_http_modelcache_compile_values(cf,
                              ngx_http_modelcache_default_credentials,
                              sizeof(ngx_http_modelcache_default_credentials)
                              / sizeof(ngx_str_t));
    if (mmcf->credentials == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_modelcache_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_modelcache_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_modelcache_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->shm_zone = NULL;
     *     conf->passes = NULL;
     *     conf->scope = NULL;
     *     conf->lookup = NULL;
     *     conf->list_field = { 0, NULL };
     *     conf->transform = { 0, NULL };
     *     conf->labelled = 0;
     *     conf->purge_zone = NULL;
     *     conf->stats_zone = NULL;
     *     conf->enabled_set = 0;
     */

    conf->ttl = NGX_CONF_UNSET;
    conf->filter = NGX_CONF_UNSET;
    conf->hide = NGX_CONF_UNSET_PTR;
    conf->show = NGX_CONF_UNSET_PTR;
    conf->credentials = NGX_CONF_UNSET_PTR;
    conf->bypass = NGX_CONF_UNSET_PTR;
    conf->status_header = NGX_CONF_UNSET;
    conf->lock_timeout = NGX_CONF_UNSET_MSEC;
    conf->stale_while_revalidate = NGX_CONF_UNSET;
    conf->stale_if_error = NGX_CONF_UNSET;

    return conf;
}


static char *
ngx_http_modelcache_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_modelcache_loc_conf_t *prev = parent;
    ngx_http_modelcache_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t         *clcf;
    ngx_http_modelcache_main_conf_t  *mmcf;

    mmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_modelcache_module);

    ngx_conf_merge_sec_value(conf->ttl, prev->ttl, 60);
    ngx_conf_merge_ptr_value(conf->credentials, prev->credentials,
                             mmcf->credentials);
    ngx_conf_merge_ptr_value(conf->bypass, prev->bypass, NULL);
    ngx_conf_merge_value(conf->status_header, prev->status_header, 1);
    ngx_conf_merge_msec_value(conf->lock_timeout, prev->lock_timeout, 5000);
    ngx_conf_merge_sec_value(conf->stale_while_revalidate,
                             prev->stale_while_revalidate, 30);
    ngx_conf_merge_sec_value(conf->stale_if_error, prev->stale_if_error, 600);
    ngx_conf_merge_value(conf->filter, prev->filter, 0);
    ngx_conf_merge_ptr_value(conf->hide, prev->hide, NULL);
    ngx_conf_merge_ptr_value(conf->show, prev->show, NULL);
    ngx_conf_merge_str_value(conf->list_field, prev->list_field, "");

    if (conf->scope == NULL) {
        conf->scope = prev->scope;
    }

    /* "modelcache" and "modelcache_pass" belong to one location only */

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (conf->shm_zone && conf->passes == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"modelcache\" in location \"%V\" has no "
                           "\"modelcache_pass\"", &clcf->name);
        return NGX_CONF_ERROR;
    }

    if (conf->lookup && conf->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"modelcache_lookup\" in location \"%V\" is set "
                           "without \"modelcache\"", &clcf->name);
        return NGX_CONF_ERROR;
    }

    if (conf->passes && conf->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"modelcache_pass\" in location \"%V\" is set "
                           "without \"modelcache\"", &clcf->name);
        return NGX_CONF_ERROR;
    }

    if (conf->shm_zone
        && (ngx_http_modelcache_merge_passes(cf, conf) != NGX_CONF_OK
            || ngx_http_modelcache_merge_transform(cf, conf) != NGX_CONF_OK))
    {
        return NGX_CONF_ERROR;
    }

    /* a content handler set after ours (proxy_pass does not check) */

    if ((conf->shm_zone && clcf->handler != ngx_http_modelcache_handler)
        || (conf->purge_zone
            && clcf->handler != ngx_http_modelcache_purge_handler)
        || (conf->stats_zone
            && clcf->handler != ngx_http_modelcache_stats_handler))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "a modelcache directive in location \"%V\" "
                           "conflicts with another content handler",
                           &clcf->name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_modelcache_init(ngx_conf_t *cf)
{
    ngx_uint_t                        i;
    ngx_http_modelcache_zone_ref_t   *ref;
    ngx_http_modelcache_main_conf_t  *mmcf;

    mmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_modelcache_module);

    /* zones may be declared after the locations that use them */

    ref = mmcf->zone_refs.elts;

    for (i = 0; i < mmcf->zone_refs.nelts; i++) {
        if (ref[i].shm_zone->data == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"%V\" uses unknown modelcache zone \"%V\" "
                          "(no \"modelcache_zone zone=%V:SIZE\") in %s:%ui",
                          &ref[i].directive, &ref[i].shm_zone->shm.name,
                          &ref[i].shm_zone->shm.name, ref[i].file,
                          ref[i].line);
            return NGX_ERROR;
        }
    }

    return ngx_http_modelcache_fetch_init_filters(cf);
}


static void
ngx_http_modelcache_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_modelcache_key_cleanup();
}


static char *
ngx_http_modelcache_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    u_char                      *p;
    size_t                       size, max_entry;
    time_t                       inactive;
    ngx_str_t                   *value, name, s;
    ngx_uint_t                   i;
    ngx_shm_zone_t              *shm_zone;
    ngx_http_modelcache_zone_t  *zone;

    value = cf->args->elts;

    size = 0;
    max_entry = NGX_CONF_UNSET_SIZE;
    inactive = 3600;
    ngx_str_null(&name);

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            if (name.data) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            name.data = value[i].data + 5;
            p = (u_char *) ngx_strchr(name.data, ':');

            if (p == NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\", "
                                   "expected zone=NAME:SIZE", &value[i]);
                return NGX_CONF_ERROR;
            }

            name.len = p - name.data;

            if (name.len == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone name in \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);

            if (size == (size_t) NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            if (size < 8 * ngx_pagesize) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small (%V), "
                                   "the minimum is %uzk", &name, &s,
                                   8 * ngx_pagesize / 1024);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "max_entry=", 10) == 0) {

            s.data = value[i].data + 10;
            s.len = value[i].len - 10;

            max_entry = ngx_parse_size(&s);

            if (max_entry == (size_t) NGX_ERROR || max_entry == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid max_entry \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "inactive=", 9) == 0) {

            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            inactive = ngx_parse_time(&s, 1);

            if (inactive == (time_t) NGX_ERROR || inactive == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid inactive \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (name.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (max_entry == NGX_CONF_UNSET_SIZE) {
        max_entry = ngx_min(8 * 1024 * 1024, size / 2);

    } else if (max_entry >= size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "max_entry=%uz of zone \"%V\" must be smaller "
                           "than the zone (%uz)", max_entry, &name, size);
        return NGX_CONF_ERROR;
    }

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_modelcache_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    zone->max_entry = max_entry;
    zone->inactive = inactive;

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_modelcache_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    zone->shm_zone = shm_zone;

    shm_zone->init = ngx_http_modelcache_zone_init;
    shm_zone->data = zone;

    return NGX_CONF_OK;
}


static char *
ngx_http_modelcache(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_modelcache_loc_conf_t *mlcf = conf;

    ngx_str_t  *value;

    if (mlcf->enabled_set) {
        return "is duplicate";
    }

    mlcf->enabled_set = 1;

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        return NGX_CONF_OK;
    }

    mlcf->shm_zone = ngx_http_modelcache_zone_ref(cf, &value[1]);
    if (mlcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_modelcache_set_handler(cf, ngx_http_modelcache_handler)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_modelcache_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_modelcache_loc_conf_t *mlcf = conf;

    u_char                            *p;
    ngx_str_t                         *value;
    ngx_http_modelcache_pass_t        *pass;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    if (value[1].len == 0
        || (value[1].data[0] != '/' && value[1].data[0] != '$'))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" needs a local URI starting with \"/\", "
                           "not \"%V\"", &cmd->name, &value[1]);
        return NGX_CONF_ERROR;
    }

    if (mlcf->passes == NULL) {
        mlcf->passes = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_modelcache_pass_t));
        if (mlcf->passes == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    pass = ngx_array_push(mlcf->passes);
    if (pass == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(pass, sizeof(ngx_http_modelcache_pass_t));

    if (cf->args->nelts == 3) {
        if (ngx_strncmp(value[2].data, "provider=", 9) != 0
            || value[2].len == 9)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\", expected "
                               "provider=LABEL", &value[2]);
            return NGX_CONF_ERROR;
        }

        pass->provider.data = value[2].data + 9;
        pass->provider.len = value[2].len - 9;

        /* it goes into JSON strings and a header as it is */

        for (p = pass->provider.data;
             p < pass->provider.data + pass->provider.len;
             p++)
        {
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                  || (*p >= '0' && *p <= '9') || *p == '.' || *p == '_'
                  || *p == '-'))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\" has an invalid provider label "
                                   "\"%V\": letters, digits, \".\", "
                                   "\"_\" and \"-\" only", &cmd->name,
                                   &pass->provider);
                return NGX_CONF_ERROR;
            }
        }
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = &pass->uri;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_modelcache_credentials(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_modelcache_loc_conf_t *mlcf = conf;

    ngx_str_t  *value;

    if (mlcf->credentials != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (cf->args->nelts == 2 && ngx_strcmp(value[1].data, "off") == 0) {
        mlcf->credentials = NULL;
        return NGX_CONF_OK;
    }

    mlcf->credentials = ngx_http_modelcache_compile_values(cf, &value[1],
                                                       cf->args->nelts - 1);
    if (mlcf->credentials == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_modelcache_bypass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_modelcache_loc_conf_t *mlcf = conf;

    if (mlcf->bypass != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    mlcf->bypass = ngx_http_modelcache_compile_values(cf,
                                        (ngx_str_t *) cf->args->elts + 1,
                                        cf->args->nelts - 1);

    return mlcf->bypass ? NGX_CONF_OK : NGX_CONF_ERROR;
}


/* modelcache_hide, modelcache_show: a regex, "~*" for any case */

static char *
ngx_http_modelcache_rule(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    u_char                       errstr[NGX_MAX_CONF_ERRSTR];
    ngx_str_t                   *value;
    ngx_array_t                **rules;
    ngx_regex_compile_t          rc;
    ngx_http_modelcache_rule_t  *rule;

    rules = (ngx_array_t **) ((u_char *) conf + cmd->offset);
    value = cf->args->elts;

    if (*rules == NGX_CONF_UNSET_PTR) {
        *rules = ngx_array_create(cf->pool, 4,
                                  sizeof(ngx_http_modelcache_rule_t));
        if (*rules == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    rule = ngx_array_push(*rules);
    if (rule == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&rc, sizeof(ngx_regex_compile_t));

    rc.pattern = value[1];
    rc.pool = cf->pool;
    rc.err.len = NGX_MAX_CONF_ERRSTR;
    rc.err.data = errstr;

    if (rc.pattern.len >= 2 && rc.pattern.data[0] == '~'
        && rc.pattern.data[1] == '*')
    {
        rc.pattern.data += 2;
        rc.pattern.len -= 2;
        rc.options = NGX_REGEX_CASELESS;
    }

    if (rc.pattern.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" needs a regex, not \"%V\"", &cmd->name,
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ngx_regex_compile(&rc) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" has an invalid regex \"%V\": %V",
                           &cmd->name, &value[1], &rc.err);
        return NGX_CONF_ERROR;
    }

    rule->source = value[1];
    rule->regex = rc.regex;

    return NGX_CONF_OK;
}


/* modelcache_list_field NAME | auto (an empty name) */

static char *
ngx_http_modelcache_list_field(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_modelcache_loc_conf_t *mlcf = conf;

    ngx_str_t  *value;

    if (mlcf->list_field.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "auto") == 0) {
        ngx_str_set(&mlcf->list_field, "");
        return NGX_CONF_OK;
    }

    if (value[1].len == 0) {
        return "needs a member name or \"auto\"";
    }

    mlcf->list_field = value[1];

    return NGX_CONF_OK;
}


/*
 * Several modelcache_pass lines merge providers: each needs its own
 * provider=LABEL.  One line may carry a label too: its models get it.
 */

static char *
ngx_http_modelcache_merge_passes(ngx_conf_t *cf,
    ngx_http_modelcache_loc_conf_t *conf)
{
    ngx_uint_t                   i, j;
    ngx_http_modelcache_pass_t  *pass;
    ngx_http_core_loc_conf_t    *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    pass = conf->passes->elts;

    for (i = 0; i < conf->passes->nelts; i++) {

        if (pass[i].provider.len) {
            conf->labelled = 1;

        } else if (conf->passes->nelts > 1) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"modelcache_pass\" in location \"%V\" has "
                               "no provider=LABEL: with several passes, "
                               "each needs one", &clcf->name);
            return NGX_CONF_ERROR;
        }

        for (j = 0; j < i; j++) {
            if (pass[j].provider.len == pass[i].provider.len
                && ngx_strncmp(pass[j].provider.data, pass[i].provider.data,
                               pass[i].provider.len)
                   == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"modelcache_pass\" in location \"%V\" "
                                   "repeats provider=%V", &clcf->name,
                                   &pass[i].provider);
                return NGX_CONF_ERROR;
            }
        }
    }

    return NGX_CONF_OK;
}


/*
 * The location's rules as text, part of the key of each answer derived
 * here: two locations sharing a list but not their rules never share
 * what they derive from it.
 */

static char *
ngx_http_modelcache_merge_transform(ngx_conf_t *cf,
    ngx_http_modelcache_loc_conf_t *conf)
{
    u_char                      *p;
    size_t                       len;
    ngx_uint_t                   i, k;
    ngx_array_t                 *rules[2];
    ngx_http_modelcache_pass_t  *pass;
    ngx_http_modelcache_rule_t  *rule;

    rules[0] = conf->hide;
    rules[1] = conf->show;
    pass = conf->passes->elts;

    len = sizeof("field=\n") + conf->list_field.len;

    for (k = 0; k < 2; k++) {
        for (i = 0; rules[k] && i < rules[k]->nelts; i++) {
            rule = rules[k]->elts;
            len += sizeof("hide=\n") + rule[i].source.len;
        }
    }

    for (i = 0; i < conf->passes->nelts; i++) {
        len += sizeof("provider=\n") + pass[i].provider.len;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->transform.data = p;
    p = ngx_sprintf(p, "field=%V\n", &conf->list_field);

    for (k = 0; k < 2; k++) {
        for (i = 0; rules[k] && i < rules[k]->nelts; i++) {
            rule = rules[k]->elts;
            p = ngx_sprintf(p, "%s=%V\n", k ? "show" : "hide",
                            &rule[i].source);
        }
    }

    for (i = 0; i < conf->passes->nelts; i++) {
        p = ngx_sprintf(p, "provider=%V\n", &pass[i].provider);
    }

    conf->transform.len = p - conf->transform.data;

    return NGX_CONF_OK;
}


/* "modelcache_purge NAME" and "modelcache_stats NAME" */

static char *
ngx_http_modelcache_admin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_shm_zone_t  **field;
    ngx_str_t        *value;

    field = (ngx_shm_zone_t **) ((u_char *) conf + cmd->offset);

    if (*field) {
        return "is duplicate";
    }

    value = cf->args->elts;

    *field = ngx_http_modelcache_zone_ref(cf, &value[1]);
    if (*field == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_modelcache_set_handler(cf, cmd->post) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_modelcache_ttl_check(ngx_conf_t *cf, void *post, void *data)
{
    time_t  *ttl = data;

    if (*ttl < 1) {
        return "must be at least 1s";
    }

    return NGX_CONF_OK;
}


/*
 * A zone named by a location directive: looked up (or reserved with size 0)
 * now, checked in postconfiguration, when every modelcache_zone is known.
 */

static ngx_shm_zone_t *
ngx_http_modelcache_zone_ref(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_shm_zone_t                   *shm_zone;
    ngx_http_modelcache_zone_ref_t   *ref;
    ngx_http_modelcache_main_conf_t  *mmcf;

    shm_zone = ngx_shared_memory_add(cf, name, 0,
                                     &ngx_http_modelcache_module);
    if (shm_zone == NULL) {
        return NULL;
    }

    mmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_modelcache_module);

    ref = ngx_array_push(&mmcf->zone_refs);
    if (ref == NULL) {
        return NULL;
    }

    ref->shm_zone = shm_zone;
    ref->directive = ((ngx_str_t *) cf->args->elts)[0];
    ref->file = cf->conf_file->file.name.data;
    ref->line = cf->conf_file->line;

    return shm_zone;
}


static ngx_int_t
ngx_http_modelcache_set_handler(ngx_conf_t *cf, ngx_http_handler_pt handler)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" conflicts with another content handler "
                           "in location \"%V\"",
                           &((ngx_str_t *) cf->args->elts)[0], &clcf->name);
        return NGX_ERROR;
    }

    clcf->handler = handler;

    return NGX_OK;
}


static ngx_array_t *
ngx_http_modelcache_compile_values(ngx_conf_t *cf, ngx_str_t *values,
    ngx_uint_t n)
{
    ngx_uint_t                         i;
    ngx_array_t                       *a;
    ngx_http_complex_value_t          *cv;
    ngx_http_compile_complex_value_t   ccv;

    a = ngx_array_create(cf->pool, n, sizeof(ngx_http_complex_value_t));
    if (a == NULL) {
        return NULL;
    }

    for (i = 0; i < n; i++) {
        cv = ngx_array_push(a);
        if (cv == NULL) {
            return NULL;
        }

        ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

        ccv.cf = cf;
        ccv.value = &values[i];
        ccv.complex_value = cv;

        if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
            return NULL;
        }
    }

    return a;
}
