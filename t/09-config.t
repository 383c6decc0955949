#!/usr/bin/perl

# Configuration checks, with "nginx -t" only: every mistake is refused with
# a message naming the directive or value (and the file and line), and the
# valid forms (zone declared after its use, "off" values, directives at each
# level where they are allowed, variables in scope and pass) are accepted.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;

my $t = MCTest->new;
my $conf = $t->conf_path;

# a server whose one location is $loc, in a config that is otherwise valid
sub server {
    my ($loc) = @_;
    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT%%;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
        }

$loc
    }
EOF
}

sub line_of {
    my ($text, $re) = @_;
    my @lines = split /\n/, $text;
    for my $i (0 .. $#lines) {
        return $i + 1 if $lines[$i] =~ $re;
    }
    die "line_of: $re not in the config\n";
}

# $want: a regex the output must match; $line_re: the config line it must name
sub bad {
    my ($name, $http, $want, $line_re) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $text = $t->write_conf($http);
    my ($code, $out) = $t->nginx_test;
    my $where = '';
    if ($line_re) {
        my $line = line_of($text, $line_re);
        $where = " in \Q$conf\E:$line\n";
    }
    my $ok = $code != 0 && $out =~ /\[emerg\] (?:\d+#\d+: )?$want$where/;
    ok($ok, "refused: $name") or diag("exit $code, output:\n$out");
}

sub good {
    my ($name, $http) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->write_conf($http);
    my ($code, $out) = $t->nginx_test;
    ok($code == 0 && $out =~ /test is successful/ && $out !~ /\[(emerg|alert|warn)\]/,
       "accepted: $name") or diag("exit $code, output:\n$out");
}

my $ZONE = "    modelcache_zone zone=models:8m;\n";
my $CACHED = <<'EOF';
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
EOF

# ---- the baseline is valid --------------------------------------------------------

good('baseline: one zone, one modelcache location', $ZONE . server($CACHED));

# ---- unknown zone ---------------------------------------------------------------------

for my $d ('modelcache', 'modelcache_purge', 'modelcache_stats') {
    my $loc = $d eq 'modelcache'
        ? "        location = /a {\n            modelcache x;\n            modelcache_pass /_p/v1/models;\n        }\n"
        : "        location = /a {\n            $d x;\n        }\n";
    bad("\"$d\" with an unknown zone", $ZONE . server($loc),
        qr/"$d" uses unknown modelcache zone "x" \(no "modelcache_zone zone=x:SIZE"\)/,
        qr/^\s*$d x;/);
}

# ---- modelcache and modelcache_pass go together -------------------------------------------

bad('modelcache without modelcache_pass', $ZONE . server(<<'EOF'),
        location /a {
            modelcache models;
        }
EOF
    qr/"modelcache" in location "\/a" has no "modelcache_pass"/);

bad('modelcache_pass without modelcache', $ZONE . server(<<'EOF'),
        location /a {
            modelcache_pass /_p/v1/models;
        }
EOF
    qr/"modelcache_pass" in location "\/a" is set without "modelcache"/);

bad('modelcache off with a modelcache_pass', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      off;
            modelcache_pass /_p/v1/models;
        }
EOF
    qr/"modelcache_pass" in location "\/a" is set without "modelcache"/);

bad('several modelcache_pass, one without a label', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models provider=openai;
            modelcache_pass /_p/api/tags;
        }
EOF
    qr/"modelcache_pass" in location "\/a" has no provider=LABEL: with several passes, each needs one/);

bad('several modelcache_pass, a label twice', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models provider=openai;
            modelcache_pass /_p/api/tags provider=openai;
        }
EOF
    qr/"modelcache_pass" in location "\/a" repeats provider=openai/);

bad('a provider label that is not a token', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models provider=a/b;
        }
EOF
    qr/"modelcache_pass" has an invalid provider label "a\/b"/);

bad('a bad modelcache_hide regex', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_hide "(";
        }
EOF
    qr/"modelcache_hide" has an invalid regex "\(": /);

bad('a bad modelcache_show regex, case-insensitive', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_show "~*[a-";
        }
EOF
    qr/"modelcache_show" has an invalid regex "~\*\[a-": /);

bad('modelcache_hide with no regex', $ZONE . server(<<'EOF'),
        modelcache_hide "~*";
EOF
    qr/"modelcache_hide" needs a regex, not "~\*"/);

bad('modelcache_filter with a bad value', $ZONE . server(<<'EOF'),
        modelcache_filter yes;
EOF
    qr/invalid value "yes" in "modelcache_filter" directive/);

bad('modelcache_list_field twice', $ZONE . server(<<'EOF'),
        modelcache_list_field data;
        modelcache_list_field models;
EOF
    qr/"modelcache_list_field" directive is duplicate/);

for my $uri ('http://127.0.0.1/v1/models', '_p/v1/models', 'v1/models') {
    bad("modelcache_pass $uri", $ZONE . server(<<"EOF"),
        location /a {
            modelcache      models;
            modelcache_pass $uri;
        }
EOF
        qr/"modelcache_pass" needs a local URI starting with "\/", not "\Q$uri\E"/,
        qr/modelcache_pass \Q$uri\E;/);
}

for my $p ('provider=', 'label=openai', 'openai') {
    bad("modelcache_pass with \"$p\"", $ZONE . server(<<"EOF"),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models $p;
        }
EOF
        qr/invalid parameter "\Q$p\E", expected provider=LABEL/,
        qr/modelcache_pass \/_p\/v1\/models \Q$p\E;/);
}

bad('modelcache_pass with three arguments', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models provider=a provider=b;
        }
EOF
    qr/invalid number of arguments in "modelcache_pass" directive/);

# ---- modelcache_zone -------------------------------------------------------------------------

my %zone_bad = (
    'zone=x'                    => qr/invalid zone size "zone=x", expected zone=NAME:SIZE/,
    'zone=x:abc'                => qr/invalid zone size "zone=x:abc"/,
    'zone=x:'                   => qr/invalid zone size "zone=x:"/,
    'zone=x:16k'                => qr/zone "x" is too small \(16k\), the minimum is 32k/,
    'zone=x:32767'              => qr/zone "x" is too small \(32767\), the minimum is 32k/,
    'zone=x:8m max_entry=abc'   => qr/invalid max_entry "max_entry=abc"/,
    'zone=x:8m max_entry=0'     => qr/invalid max_entry "max_entry=0"/,
    'zone=x:8m max_entry=8m'    => qr/max_entry=8388608 of zone "x" must be smaller than the zone \(8388608\)/,
    'zone=x:8m max_entry=9m'    => qr/max_entry=9437184 of zone "x" must be smaller than the zone \(8388608\)/,
    'zone=x:8m inactive=abc'    => qr/invalid inactive "inactive=abc"/,
    'zone=x:8m inactive=0'      => qr/invalid inactive "inactive=0"/,
    'zone=x:8m foo=1'           => qr/invalid parameter "foo=1"/,
    'zone=x:8m max_entry'       => qr/invalid parameter "max_entry"/,
    'max_entry=1m'              => qr/"modelcache_zone" must have "zone" parameter/,
);
for my $args (sort keys %zone_bad) {
    bad("modelcache_zone $args", "    modelcache_zone $args;\n" . server(''),
        $zone_bad{$args}, qr/^\s*modelcache_zone \Q$args\E;/);
}

bad('two zone= parameters', server('') . "    modelcache_zone zone=a:8m zone=b:8m;\n",
    qr/duplicate parameter "zone=b:8m"/, qr/modelcache_zone zone=a/);

bad('an empty zone name', server('') . "    modelcache_zone zone=:8m;\n",
    qr/invalid zone name in "zone=:8m"/, qr/modelcache_zone zone=:8m/);

bad('modelcache_zone without arguments', "    modelcache_zone;\n" . server(''),
    qr/invalid number of arguments in "modelcache_zone" directive/);

bad('duplicate zone', $ZONE . "    modelcache_zone zone=models:8m;\n" . server($CACHED),
    qr/duplicate zone "models"/);

bad('the same zone name with another size', $ZONE . "    modelcache_zone zone=models:16m;\n"
    . server($CACHED), qr/the size 16777216 of shared memory zone "models" conflicts with already declared size 8388608/);

bad('modelcache_zone inside server', server("        modelcache_zone zone=y:8m;\n"),
    qr/"modelcache_zone" directive is not allowed here/, qr/modelcache_zone zone=y/);

bad('modelcache_zone inside location', $ZONE . server(<<'EOF'),
        location /a {
            modelcache_zone zone=y:8m;
        }
EOF
    qr/"modelcache_zone" directive is not allowed here/, qr/modelcache_zone zone=y/);

# another module's zone of the same name
bad('limit_req_zone, then modelcache_zone of the same name', <<'EOF' . server($CACHED),
    limit_req_zone $binary_remote_addr zone=models:1m rate=1r/s;
    modelcache_zone zone=models:8m;
EOF
    qr/the shared memory zone "models" is already declared for a different use/,
    qr/^\s*modelcache_zone zone=models/);

bad('modelcache_zone, then limit_req_zone of the same name', <<'EOF' . server($CACHED),
    modelcache_zone zone=models:8m;
    limit_req_zone $binary_remote_addr zone=models:1m rate=1r/s;
EOF
    qr/the shared memory zone "models" is already declared for a different use/,
    qr/^\s*limit_req_zone/);

bad('modelcache naming a limit_req zone', <<'EOF' . server($CACHED),
    limit_req_zone $binary_remote_addr zone=models:1m rate=1r/s;
EOF
    qr/the shared memory zone "models" is already declared for a different use/,
    qr/^\s*modelcache\s+models;/);

# ---- modelcache_ttl, modelcache_status_header ------------------------------------------------------

for my $ttl ('0', '0s') {
    bad("modelcache_ttl $ttl", $ZONE . server(<<"EOF"),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  $ttl;
        }
EOF
        qr/"modelcache_ttl" directive must be at least 1s/, qr/modelcache_ttl\s+$ttl;/);
}

bad('modelcache_ttl 0 at http level', $ZONE . "    modelcache_ttl 0;\n" . server($CACHED),
    qr/"modelcache_ttl" directive must be at least 1s/, qr/^\s*modelcache_ttl 0;/);

for my $ttl ('abc', '-5s', '10q') {
    bad("modelcache_ttl $ttl", $ZONE . server(<<"EOF"),
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  $ttl;
        }
EOF
        qr/"modelcache_ttl" directive invalid value/, qr/modelcache_ttl\s+\Q$ttl\E;/);
}

bad('modelcache_status_header maybe', $ZONE . server(<<'EOF'),
        location /a {
            modelcache               models;
            modelcache_pass          /_p/v1/models;
            modelcache_status_header maybe;
        }
EOF
    qr/invalid value "maybe" in "modelcache_status_header" directive, it must be "on" or "off"/,
    qr/modelcache_status_header maybe;/);

# ---- content handlers ------------------------------------------------------------------------------

bad('modelcache and modelcache_stats in one location', $ZONE . server(<<'EOF'),
        location /a {
            modelcache       models;
            modelcache_pass  /_p/v1/models;
            modelcache_stats models;
        }
EOF
    qr/"modelcache_stats" conflicts with another content handler in location "\/a"/,
    qr/modelcache_stats models;/);

bad('modelcache_purge and modelcache in one location', $ZONE . server(<<'EOF'),
        location /a {
            modelcache_purge models;
            modelcache       models;
            modelcache_pass  /_p/v1/models;
        }
EOF
    qr/"modelcache" conflicts with another content handler in location "\/a"/,
    qr/^\s*modelcache\s+models;/);

bad('modelcache_stats and modelcache_purge in one location', $ZONE . server(<<'EOF'),
        location /a {
            modelcache_stats models;
            modelcache_purge models;
        }
EOF
    qr/"modelcache_purge" conflicts with another content handler in location "\/a"/,
    qr/modelcache_purge models;/);

bad('proxy_pass, then modelcache', $ZONE . server(<<'EOF'),
        location /a {
            proxy_pass      http://127.0.0.1:%%MOCK%%;
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
EOF
    qr/"modelcache" conflicts with another content handler in location "\/a"/);

for my $d (['modelcache, then proxy_pass', "modelcache      models;\n"
             . "            modelcache_pass /_p/v1/models;"],
          ['modelcache_stats, then proxy_pass', 'modelcache_stats models;'],
          ['modelcache_purge, then proxy_pass', 'modelcache_purge models;'])
{
    bad($d->[0], $ZONE . server(<<"EOF"),
        location /a {
            $d->[1]
            proxy_pass      http://127.0.0.1:%%MOCK%%;
        }
EOF
        qr/a modelcache directive in location "\/a" conflicts with another content handler/);
}

# ---- duplicates, levels, arguments ---------------------------------------------------------------------

bad('modelcache twice', $ZONE . server(<<'EOF'),
        location /a {
            modelcache      models;
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
EOF
    qr/"modelcache" directive is duplicate/);

bad('modelcache_stats twice', $ZONE . server(<<'EOF'),
        location /a {
            modelcache_stats models;
            modelcache_stats models;
        }
EOF
    qr/"modelcache_stats" directive is duplicate/);

bad('modelcache_credentials twice', $ZONE . server(<<'EOF'),
        location /a {
            modelcache             models;
            modelcache_pass        /_p/v1/models;
            modelcache_credentials $http_authorization;
            modelcache_credentials $http_x_api_key;
        }
EOF
    qr/"modelcache_credentials" directive is duplicate/);

bad('modelcache at server level', $ZONE . server("        modelcache models;\n"),
    qr/"modelcache" directive is not allowed here/, qr/^\s*modelcache models;/);

bad('modelcache at http level', $ZONE . "    modelcache models;\n" . server(''),
    qr/"modelcache" directive is not allowed here/, qr/^\s*modelcache models;/);

bad('modelcache_pass at server level', $ZONE . server("        modelcache_pass /_p/v1/models;\n"),
    qr/"modelcache_pass" directive is not allowed here/);

bad('modelcache_purge at server level', $ZONE . server("        modelcache_purge models;\n"),
    qr/"modelcache_purge" directive is not allowed here/);

bad('modelcache_stats at http level', $ZONE . "    modelcache_stats models;\n" . server(''),
    qr/"modelcache_stats" directive is not allowed here/);

bad('modelcache without a zone name', $ZONE . server(<<'EOF'),
        location /a {
            modelcache;
            modelcache_pass /_p/v1/models;
        }
EOF
    qr/invalid number of arguments in "modelcache" directive/);

bad('modelcache_scope with two values', $ZONE . server(<<'EOF'),
        location /a {
            modelcache       models;
            modelcache_pass  /_p/v1/models;
            modelcache_scope $http_x_profile $host;
        }
EOF
    qr/invalid number of arguments in "modelcache_scope" directive/);

bad('modelcache_scope with an unknown variable', $ZONE . server(<<'EOF'),
        location /a {
            modelcache       models;
            modelcache_pass  /_p/v1/models;
            modelcache_scope $no_such_variable;
        }
EOF
    qr/unknown "no_such_variable" variable/);

bad('modelcache_pass with an unknown variable', $ZONE . server(<<'EOF'),
        location /a {
            modelcache       models;
            modelcache_pass  /_p/$no_such_variable;
        }
EOF
    qr/unknown "no_such_variable" variable/);

bad('modelcache_credentials with an unknown variable', $ZONE . server(<<'EOF'),
        location /a {
            modelcache             models;
            modelcache_pass        /_p/v1/models;
            modelcache_credentials $http_authorization $no_such_variable;
        }
EOF
    qr/unknown "no_such_variable" variable/);

# ---- valid configs ------------------------------------------------------------------------------------------

good('zone declared after the locations that use it', server(<<'EOF') . <<'EOF2');
        location = /a {
            modelcache      late;
            modelcache_pass /_p/v1/models;
        }

        location = /purge {
            modelcache_purge late;
        }

        location = /stats {
            modelcache_stats late;
        }
EOF
    modelcache_zone zone=late:1m;
EOF2

good('modelcache off', $ZONE . server(<<'EOF'));
        location /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;

            location /a/plain {
                modelcache off;
                return 204;
            }
        }

        location /b {
            modelcache off;
        }
EOF

good('modelcache_credentials off', $ZONE . server(<<'EOF'));
        location /a {
            modelcache             models;
            modelcache_pass        /_p/v1/models;
            modelcache_credentials off;
        }
EOF

good('modelcache_credentials with several values', $ZONE . server(<<'EOF'));
        location /a {
            modelcache             models;
            modelcache_pass        /_p/v1/models;
            modelcache_credentials $http_authorization "key:$http_x_api_key" $cookie_session;
        }
EOF

good('every directive at each level where it is allowed', <<'EOF');
    modelcache_zone          zone=models:8m max_entry=1m inactive=30m;
    modelcache_zone          zone=small:32k;
    modelcache_ttl           120s;
    modelcache_scope         http-level;
    modelcache_credentials   $http_authorization;
    modelcache_status_header off;

    server {
        listen 127.0.0.1:%%PORT%%;

        modelcache_ttl           2m;
        modelcache_scope         $host;
        modelcache_credentials   off;
        modelcache_status_header on;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
        }

        location = /a {
            modelcache               models;
            modelcache_pass          /_p/v1/models provider=openai;
            modelcache_ttl           1h;
            modelcache_scope         "";
            modelcache_credentials   $http_x_api_key;
            modelcache_status_header off;
        }

        location = /b {
            modelcache      small;
            modelcache_pass /_p/api/tags;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF

good('modelcache_scope with variables', $ZONE . server(<<'EOF'));
        location /a {
            modelcache       models;
            modelcache_pass  /_p/v1/models;
            modelcache_scope "$http_x_profile/$host:$arg_team";
        }
EOF

good('modelcache_pass with variables and args', $ZONE . server(<<'EOF'));
        location ~ ^/v/(?<ver>\w+)/models$ {
            modelcache      models;
            modelcache_pass /_p/$ver/models?limit=1000&after=$arg_after provider=openai;
        }

        location = /b {
            set $provider_uri /_p/api/tags?x=1;
            modelcache      models;
            modelcache_pass $provider_uri;
        }
EOF

good('modelcache_ttl 1s and large ttls', $ZONE . server(<<'EOF'));
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  1;
        }

        location = /b {
            modelcache      models;
            modelcache_pass /_p/api/tags;
            modelcache_ttl  30d;
        }
EOF

good('the smallest zone (32k) and max_entry just under the size', <<'EOF' . server(<<'EOF2'));
    modelcache_zone zone=models:32k max_entry=32767;
EOF
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
EOF2

good('several zones, one modelcache_purge/stats per zone', <<'EOF' . server(<<'EOF2'));
    modelcache_zone zone=a:1m;
    modelcache_zone zone=b:2m max_entry=1m;
    limit_req_zone $binary_remote_addr zone=other:1m rate=1r/s;
EOF
        location = /a {
            modelcache      a;
            modelcache_pass /_p/v1/models;
        }

        location = /b {
            modelcache      b;
            modelcache_pass /_p/v1/models;
        }

        location = /purge/a { modelcache_purge a; }
        location = /purge/b { modelcache_purge b; }
        location = /stats/a { modelcache_stats a; }
        location = /stats/b { modelcache_stats b; }
EOF2

good('a zone nobody uses', "    modelcache_zone zone=unused:1m;\n" . server(''));

$t->done_testing;
