#!/bin/bash
# make asan: nginx from Debian's source package (1.22.1 on Debian 12) built
# with AddressSanitizer + UBSan, our module built in that tree with the same
# flags, and the whole suite (prove t/) run against the two.  Exits non-zero
# when prove fails or an error log holds a sanitizer report, and then prints
# each different report once, stack included.
#
# Everything lives under build/asan/: src/ (the unpacked source package),
# sbin/nginx and modules/ngx_http_modelcache_module.so (make install),
# nginx-test (what the suite runs as NGINX_BIN, see write_wrapper), the
# suppression files and the logs of each step.
# A second run reuses all of it: no apt, no download, no configure unless its
# arguments or our config script changed, and make rebuilds only what
# changed.  rm -rf build/asan starts over.
#
# Runs unattended (no stdin needed); installs the Debian packages it needs
# and, on a machine with no deb-src entries, adds them (see ensure_deb_src).
#
# Environment: PROVE_FLAGS (extra prove arguments), ASAN_OPTIONS and
# UBSAN_OPTIONS (appended to ours, so they win: UBSAN_OPTIONS=halt_on_error=1
# stops a process at its first UBSan report), JOBS (make -j, default nproc).

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
asan=$top/build/asan
src=$asan/src
jobs=${JOBS:-$(nproc)}

# Debian packages: apt-get source, the compiler (libasan8 and libubsan1 come
# with gcc-12), the libraries of the nginx modules we configure and of ours,
# and what the test harness runs (prove, python3 for the mock provider).
packages="dpkg-dev gcc make libc6-dev libpcre2-dev zlib1g-dev libssl-dev
          libjansson-dev perl python3"

cc_opt="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined"
# Every pool allocation its own malloc(), so ASan sees overflows of pool
# memory too, not only of whole pool blocks.
cc_opt="$cc_opt -DNGX_DEBUG_PALLOC=1"
ld_opt="-fsanitize=address,undefined"

# Reports go to stderr, which nginx points at the error_log of the
# configuration, where t/lib/MCTest.pm looks for them (AddressSanitizer,
# runtime error:).  It does so only once it has daemonized, though: what
# goes wrong while it parses its configuration, creates its zones or runs
# nginx -t would reach only the harness's pipe, which it does not read when
# nginx starts.  So the suite runs nginx through a wrapper (write_wrapper)
# that copies such reports into the error log.  (log_path cannot do it:
# with GCC, UBSan's runtime, libubsan, writes to stderr whatever log_path
# says.)  ASan stops a process at its first report (recovering would need
# -fsanitize-recover=address), UBSan reports and goes on.
# nginx's master keeps its cycle until exit by design: no leak checking.
asan_options="detect_leaks=0:abort_on_error=0:halt_on_error=1:handle_abort=1"
ubsan_options="print_stacktrace=1:halt_on_error=0:report_error_type=1"

# What nginx itself does and is not ours to fix.  A UBSan check is
# suppressed in that nginx function only, whoever called it.
write_suppressions() {
    # A dynamic module carries its own ngx_modules, ngx_module_names and
    # ngx_module_order arrays, which nginx reads with dlsym(); the binary,
    # linked with -E, exports arrays of the same names.
    cat > "$asan/asan.supp" <<'SUPP'
odr_violation:^ngx_modules$
odr_violation:^ngx_module_names$
odr_violation:^ngx_module_order$
SUPP
    # nginx copies empty strings whose data is NULL (ngx_null_string, unset
    # parameters) with memcpy(dst, NULL, 0): ngx_cycle.c the empty -g
    # parameters, %V in ngx_sprintf() and friends, the file cache an empty
    # ETag.
    cat > "$asan/ubsan.supp" <<'SUPP'
nonnull-attribute:ngx_pstrdup
nonnull-attribute:ngx_sprintf_str
nonnull-attribute:ngx_http_file_cache_set_header
SUPP
}

# NGINX_BIN for the suite: the ASan nginx, with what it writes to stderr
# before it has its error log (see above) passed on to the harness and, when
# that holds a sanitizer report, appended to <prefix>/error.log too (MCTest
# runs nginx -p <dir>/ with the error log <dir>/error.log).
write_wrapper() {
    cat > "$asan/nginx-test" <<EOF
#!/bin/bash
# written by scripts/asan.sh (make asan), see write_wrapper there
out=\$(mktemp) || exit 1
status=0
'$asan/sbin/nginx' "\$@" 2> "\$out" || status=\$?
cat "\$out" >&2
prefix=
while [ \$# -gt 1 ]; do
    if [ "\$1" = -p ]; then prefix=\$2; break; fi
    shift
done
if [ -n "\$prefix" ] && grep -E 'Sanitizer|runtime error:' "\$out" > /dev/null
then
    cat "\$out" >> "\${prefix%/}/error.log"
fi
rm -f "\$out"
exit \$status
EOF
    chmod 0755 "$asan/nginx-test"
}

# make asan passes its own MAKEFLAGS; nginx's make needs none of them.
unset MAKEFLAGS MFLAGS

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive

say() { printf 'asan: %s\n' "$*"; }
die() { printf 'asan: error: %s\n' "$*" >&2; exit 1; }

# Runs a quiet step, its output in $1; on failure shows the end of it.
logged() {
    local log=$1
    shift
    if ! "$@" > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "'$*' failed (whole output in ${log#"$top"/})"
    fi
}

apt_updated=no
apt_update() {
    [ $apt_updated = yes ] && return
    say "apt-get update"
    logged "$asan/apt-update.log" $sudo apt-get update </dev/null
    apt_updated=yes
}

ensure_packages() {
    local p missing=""
    for p in $packages; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
            | grep 'install ok installed' > /dev/null || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    apt_update
    say "installing Debian packages:$missing"
    # shellcheck disable=SC2086
    logged "$asan/apt-install.log" $sudo apt-get install -y -q \
        --no-install-recommends $missing </dev/null
}

# The deb-src entries apt-get source needs, when the machine has none for
# this release (a fresh Debian has none): for each Debian suite of the release
# it installs from (<codename>, -updates, -security), a copy of its deb entry
# (same URIs, Signed-By and options) as deb-src, in
# modelcache-asan-src.{sources,list} next to the machine's own source files.
# Then apt-get update, if apt has no nginx source yet.
ensure_deb_src() {
    local codename parts out
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release"
    eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
    parts=${parts%/}
    [ -n "${parts:-}" ] || die "apt-config knows no Dir::Etc::sourceparts"

    # shellcheck disable=SC2016
    out=$(apt-get indextargets --no-release-info \
              --format '$(TARGET_OF) $(REPO_URI) $(RELEASE) $(COMPONENT) $(SOURCESENTRY)' \
          | CODENAME=$codename perl -e '
        use strict;
        use warnings;
        my $re = qr/^\Q$ENV{CODENAME}\E(?:-updates|-security)?$/;
        my @targets = map { [ split ] } <STDIN>;
        my %want;    # file => uri => suite => 1
        # a machine that has deb-src entries for this release keeps them
        @targets = () if grep { $_->[0] eq "deb-src" && $_->[2] =~ $re } @targets;
        for (grep { $_->[0] eq "deb" && $_->[2] =~ $re } @targets) {
            my ($type, $uri, $suite, $comp, $entry) = @$_;
            $entry =~ s/:\d+$//;
            $want{$entry}{norm($uri)}{$suite} = 1;
        }
        my (@stanzas, @lines);
        for my $file (sort keys %want) {
            open(my $fh, "<", $file) or die "cannot read $file: $!\n";
            my $text = do { local $/; <$fh> };
            if ($file =~ /\.sources$/) {
                push @stanzas, deb822($text, $want{$file});
            } else {
                push @lines, oneline($text, $want{$file});
            }
        }
        print "sources\n", map({ "$_\n" } @stanzas), "list\n", map({ "$_\n" } @lines);

        sub norm { my ($u) = @_; $u =~ s{/*$}{/}; return $u }

        # stanzas of Types: deb whose URIs and Suites cover what is wanted,
        # copied with Types: deb-src and only the wanted suites
        sub deb822 {
            my ($text, $want) = @_;
            my @out;
            for my $para (split /\n[ \t]*\n/, $text) {
                my @l = grep { !/^#/ } split /\n/, $para;
                my %f;
                my $key;
                for (@l) {
                    if (/^([\w-]+):\s*(.*)$/) { $key = lc $1; $f{$key} = $2 }
                    elsif (defined $key) { $f{$key} .= "\n$_" }
                }
                next unless ($f{types} // "") =~ /(?:^|\s)deb(?:\s|$)/;
                next if ($f{enabled} // "yes") =~ /^no$/i;
                my @uris = map { norm($_) } split " ", $f{uris} // "";
                my %suites;
                for my $u (@uris) {
                    $suites{$_} = 1 for grep { $want->{$u}{$_} }
                        split " ", $f{suites} // "";
                }
                next unless %suites;
                for my $u (@uris) { delete $want->{$u}{$_} for keys %suites }
                my @copy = map {
                    /^types:/i  ? "Types: deb-src"
                  : /^suites:/i ? "Suites: " . join(" ", sort keys %suites)
                  : $_
                } @l;
                push @out, join("\n", @copy) . "\n";
            }
            return @out;
        }

        # one-line entries "deb [options] uri suite components..."
        sub oneline {
            my ($text, $want) = @_;
            my @out;
            for my $line (split /\n/, $text) {
                next unless $line =~ /^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s/;
                my ($uri, $suite) = (norm($2), $3);
                next unless $want->{$uri}{$suite};
                delete $want->{$uri}{$suite};
                (my $copy = $line) =~ s/^\s*deb\b/deb-src/;
                push @out, $copy;
            }
            return @out;
        }
    ') || die "could not work out the deb-src entries to add"

    local stanzas lines
    stanzas=$(printf '%s\n' "$out" | sed -n '/^sources$/,/^list$/p' | sed '1d;$d')
    lines=$(printf '%s\n' "$out" | sed -n '/^list$/,$p' | sed '1d')
    local head="# added by $top/scripts/asan.sh (make asan) for apt-get source nginx"
    if [ -n "$stanzas" ]; then
        [ -f "$parts/modelcache-asan-src.sources" ] || stanzas="$head
$stanzas"
        printf '%s\n\n' "$stanzas" | $sudo tee -a "$parts/modelcache-asan-src.sources" > /dev/null
        say "added deb-src entries to $parts/modelcache-asan-src.sources:"
        printf '%s\n' "$stanzas" | sed 's/^/    /'
    fi
    if [ -n "$lines" ]; then
        [ -f "$parts/modelcache-asan-src.list" ] || lines="$head
$lines"
        printf '%s\n' "$lines" | $sudo tee -a "$parts/modelcache-asan-src.list" > /dev/null
        say "added deb-src entries to $parts/modelcache-asan-src.list:"
        printf '%s\n' "$lines" | sed 's/^/    /'
    fi
    [ -z "$stanzas$lines" ] || apt_updated=no
    if [ -n "$stanzas$lines" ] || ! have_nginx_source; then
        apt_update
    fi
    have_nginx_source \
        || die "apt knows no source package nginx, even after adding deb-src entries"
}

# (no grep -q: under pipefail apt-cache would die of SIGPIPE)
have_nginx_source() {
    apt-cache showsrc --only-source nginx 2>/dev/null \
        | grep '^Package: nginx$' > /dev/null
}

# build/asan/src/nginx-<version>, unpacked (Debian's patches applied) once.
fetch_source() {
    if [ -f "$src/.tree" ] && [ -x "$(cat "$src/.tree")/configure" ]; then
        tree=$(cat "$src/.tree")
        say "nginx source: ${tree#"$top"/} (already unpacked)"
        return
    fi
    ensure_deb_src
    rm -rf "$src"
    mkdir -p "$src"
    local sandbox=() version got=""
    # as root apt would warn that _apt cannot write here
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    # Newest first; an older one when a mirror lacks the newest's files (some
    # mirrors of debian-security carry no sources).
    for version in $(apt-cache showsrc --only-source nginx \
                         | sed -n 's/^Version: //p' | sort -u | sort -rV); do
        say "apt-get source nginx=$version"
        if (cd "$src" && apt-get source "${sandbox[@]}" --only-source \
                "nginx=$version" </dev/null >> "$asan/apt-source.log" 2>&1); then
            got=$version
            break
        fi
        say "could not fetch nginx $version, see ${asan#"$top"/}/apt-source.log"
        rm -rf "${src:?}"/nginx-*
    done
    [ -n "$got" ] || die "apt-get source nginx failed for every version apt knows"
    tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'nginx-*')
    if [ -z "$tree" ] || [ ! -x "$tree/configure" ]; then
        die "apt-get source nginx left no nginx-*/configure in ${src#"$top"/}"
    fi
    say "unpacked $(cd "$src" && ls nginx_*.dsc) into ${tree#"$top"/}"
    printf '%s\n' "$tree" > "$src/.tree"
}

# configure only when its arguments or our config script changed.  It
# rewrites objs/ngx_auto_config.h and ngx_auto_headers.h, on which every
# object file depends: when their content comes out the same (only the
# module's config changed), they get their old times back, so make rebuilds
# the module and not nginx.
configure_tree() {
    local args stamp=$asan/configure.stamp
    args=(
        --prefix="$asan"
        --error-log-path=stderr
        --with-compat --with-debug --with-threads
        --with-http_ssl_module --with-http_stub_status_module
        --with-cc-opt="$cc_opt"
        --with-ld-opt="$ld_opt"
        --add-dynamic-module="$top"
    )
    local want
    want=$(printf '%q ' "${args[@]}"; echo; sha256sum < "$top/config")
    if [ -f "$tree/objs/Makefile" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        say "configure: up to date"
        return
    fi
    say "configure ${args[*]}"
    rm -f "$stamp"
    local keep=$asan/configure.keep f
    rm -rf "$keep"
    mkdir -p "$keep"
    for f in ngx_auto_config.h ngx_auto_headers.h ngx_modules.c; do
        [ ! -f "$tree/objs/$f" ] || cp -p "$tree/objs/$f" "$keep/"
    done
    (cd "$tree" && logged "$asan/configure.log" ./configure "${args[@]}")
    for f in ngx_auto_config.h ngx_auto_headers.h ngx_modules.c; do
        ! cmp -s "$keep/$f" "$tree/objs/$f" || touch -r "$keep/$f" "$tree/objs/$f"
    done
    rm -rf "$keep"
    printf '%s\n' "$want" > "$stamp"
}

build_tree() {
    say "make -j$jobs (nginx and the module, incremental), make install"
    logged "$asan/make.log" make -C "$tree" -j"$jobs"
    logged "$asan/install.log" make -C "$tree" install
    # workers run as nobody and symbolize their own stack traces: they must
    # read the binary and the module
    chmod -R a+rX "$asan/sbin" "$asan/modules"
}

# Prints the sanitizer reports in the error logs given, each different one
# once.  UBSan's runtime does not see dlopen(), so it leaves the module's
# frames as "(module.so+0xoffset)": those are asked of addr2line (a frame
# above #0 is a return address, the call is the byte before).
print_reports() {
    perl -e '
        use strict;
        use warnings;
        my (@order, %count, %where);
        for my $log (@ARGV) {
            open(my $fh, "<", $log) or next;
            my ($dir) = $log =~ m{([^/]+)/error\.log$};
            my @blocks;
            while (my $l = <$fh>) {
                # nginx'"'"'s own lines
                next if $l =~ m{^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[};
                push @blocks, "" if !@blocks
                    || $l =~ /runtime error:|^=+$|^==\d+==ERROR:/
                       && $blocks[-1] !~ /\A=+\n\z/;
                $blocks[-1] .= $l;
            }
            for my $b (@blocks) {
                next unless $b =~ /Sanitizer|runtime error:/;
                my $key = key($b);
                push @order, $b unless $count{$key}++;
                $where{$key}{$dir} = 1;
            }
        }
        for my $b (@order) {
            my $key = key($b);
            printf "\n---- %d time(s), in %s\n", $count{$key},
                join(", ", sort keys %{ $where{$key} });
            print map { symbolize($_) } split /^/, $b;
        }

        # the same report: the same first line and the same innermost frames
        # (by address: the module frames of UBSan have no names)
        sub key {
            my ($b) = @_;
            my ($first) = $b =~ /^((?:=+\n)?.*)/;
            my @frames = $b =~ /^\s*#\d+ 0x[0-9a-f]*?([0-9a-f]{3}) /mg;
            $first =~ s/0x[0-9a-f]+|==\d+==//g;
            return join " ", $first, @frames[0 .. ($#frames < 7 ? $#frames : 7)];
        }

        sub symbolize {
            my ($line) = @_;
            my ($head, $n, $file, $off) =
                $line =~ m{^(\s*#(\d+) 0x[0-9a-f]+)\s+\((/\S+)\+0x([0-9a-f]+)\)\s*$};
            return $line unless defined $off && -r $file;
            my $pc = sprintf "0x%x", hex($off) - ($n > 0 ? 1 : 0);
            open(my $a2l, "-|", "addr2line", "-f", "-i", "-p", "-e", $file, $pc)
                or return $line;
            my @frames = grep { !/^\?\?/ }
                map { s/^ \(inlined by\) //r } <$a2l>;
            close $a2l;
            return $line unless @frames;
            return map { s/^(\S+) at (.*)$/$head in $1 $2/r } @frames;
        }
    ' "$@"
}

# The harness shows only the report lines of an error log; its test dirs are
# kept (MCTEST_KEEP, in a directory of their own under /tmp, where the
# workers, nobody, can reach them wherever the checkout is) so that the whole
# reports, stacks included, can be printed here.
run_tests() {
    local nginx=$asan/sbin/nginx
    local module=$asan/modules/ngx_http_modelcache_module.so
    local tmp status=0 logs
    if [ ! -x "$nginx" ] || [ ! -f "$module" ]; then
        die "make install left no $nginx or $module"
    fi
    write_suppressions
    write_wrapper
    nginx=$asan/nginx-test
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/modelcache-asan.XXXXXX")
    chmod 0755 "$tmp"
    say "prove ${PROVE_FLAGS:-}t/ with NGINX_BIN=${nginx#"$top"/}" \
        "MODELCACHE_MODULE=${module#"$top"/}"
    cd "$top"
    # shellcheck disable=SC2086
    TMPDIR=$tmp MCTEST_KEEP=1 NGINX_BIN=$nginx MODELCACHE_MODULE=$module \
    ASAN_OPTIONS="$asan_options:suppressions=$asan/asan.supp${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="$ubsan_options:suppressions=$asan/ubsan.supp${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
        prove ${PROVE_FLAGS:-} t/ || status=$?

    logs=$(grep -l -E 'AddressSanitizer|LeakSanitizer|runtime error:' \
               "$tmp"/*/error.log 2>/dev/null || true)
    if [ -n "$logs" ]; then
        say "sanitizer reports in the error logs under $tmp:"
        # shellcheck disable=SC2086
        print_reports $logs
        [ "$status" != 0 ] || status=1
    fi
    [ "$status" = 0 ] \
        || die "prove t/ failed under ASan + UBSan (test dirs kept in $tmp)"
    rm -rf "$tmp"
    say "all tests passed under ASan + UBSan"
}

mkdir -p "$asan"
ensure_packages
fetch_source
configure_tree
build_tree
run_tests
