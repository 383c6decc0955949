# ngx_http_modelcache_module
#
#   make              build build/ngx_http_modelcache_module.so against
#                     Debian's nginx-dev (or NGINX_SRC=/path/to/nginx-1.x)
#   make run          the module in front of a demo provider on :8080
#   make stop         stop what "make run" started
#   make test         the whole suite under prove
#   make bench        bench/hits, bench/callgrind-hit, bench/stampede and
#                     bench/expiry: figures next to nginx's own paths
#   make asan         the suite against nginx 1.22.1 from Debian's source
#                     package and the module, both built with ASan + UBSan
#                     (in build/asan; scripts/asan.sh)
#
# Missing Debian packages are installed first (make deps).

NGINX_SRC   ?= /usr/share/nginx/src
NGINX_BIN   ?= /usr/sbin/nginx
BUILD       := build
MODULE      := $(BUILD)/ngx_http_modelcache_module.so
SRCTREE     := $(BUILD)/nginx
CC_OPT      ?= -g -O2 -Wall -Wextra -Wno-unused-parameter -Werror
PROVE_FLAGS ?=

SOURCES := ngx_http_modelcache_module.c $(wildcard src/*.c src/*.h)

DEB_PACKAGES := nginx nginx-dev libjansson-dev libpcre2-dev libssl-dev \
                zlib1g-dev gcc make perl python3 curl

.PHONY: all deps run stop test clean

all: $(MODULE)

deps: $(BUILD)/.deps

$(BUILD)/.deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	        | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends $$missing \
	        </dev/null || exit 1; \
	fi
	@mkdir -p $(BUILD) && touch $@

# configure runs in a copy of the nginx tree: it writes objs/ into it
$(SRCTREE)/objs/Makefile: config $(BUILD)/.deps
	rm -rf $(SRCTREE)
	mkdir -p $(BUILD)
	cp -a $(NGINX_SRC) $(SRCTREE)
	cd $(SRCTREE) && ./configure --with-compat \
	    --with-cc-opt='$(CC_OPT)' --add-dynamic-module=$(CURDIR) \
	    > configure.log 2>&1 || { tail -30 configure.log; exit 1; }

$(MODULE): $(SRCTREE)/objs/Makefile $(SOURCES)
	$(MAKE) -C $(SRCTREE) -f objs/Makefile modules
	@# a new file renamed over the old: a running nginx keeps its mapping
	cp $(SRCTREE)/objs/ngx_http_modelcache_module.so $@.tmp
	mv -f $@.tmp $@

run: $(MODULE)
	@bash examples/run.sh start

stop:
	@bash examples/run.sh stop

test: $(MODULE)
	NGINX_BIN=$(NGINX_BIN) MODELCACHE_MODULE=$(CURDIR)/$(MODULE) \
	    prove $(PROVE_FLAGS) t/

# the benchmarks print figures (bench/RESULTS.md); wrk and valgrind from
# Debian's archive
BENCH_PACKAGES := wrk valgrind

bench: $(MODULE)
	@missing=""; for p in $(BENCH_PACKAGES); do \
	    command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq $$missing </dev/null || exit 1; \
	fi
	bench/hits --module $(CURDIR)/$(MODULE)
	bench/callgrind-hit --module $(CURDIR)/$(MODULE)
	bench/stampede --module $(CURDIR)/$(MODULE)
	bench/expiry --module $(CURDIR)/$(MODULE)

.PHONY: asan bench
asan:
	PROVE_FLAGS='$(PROVE_FLAGS)' bash scripts/asan.sh

clean:
	rm -rf $(BUILD)
