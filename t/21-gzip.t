#!/usr/bin/perl

# The gzip copy of a list: stored once per fetch and answered, from shared
# memory, to clients that accept gzip (Content-Encoding, Vary, its own
# ETag, 304), as gzip_static decides; never for lists it would not shrink,
# derived answers or clients that do not accept it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Uncompress::Gunzip qw(gunzip $GunzipError);
use MCTest;
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:32m max_entry=512k;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache        models;
            modelcache_pass   /_provider/v1/models;
            modelcache_filter on;
        }

        location = /tiny {
            modelcache      models;
            modelcache_pass /_provider/tiny;
        }

        location = /big {
            modelcache      models;
            modelcache_pass /_provider/openrouter/api/v1/models;
        }

        location = /no-msie {
            modelcache      models;
            modelcache_pass /_provider/v1/models;
            gzip_disable    "MSIE [1-6]\.";
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

$t->mock_route({ path => '/tiny', fixture => 'adv_empty_list.json' });

my %auth = (Authorization => 'Bearer key-a');
my $list = $t->fixture('openai_models.json');

sub gunzipped {
    my ($bytes) = @_;
    my $out;
    gunzip(\$bytes => \$out) or return "gunzip failed: $GunzipError";
    return $out;
}

sub gzip_ok {
    my ($r, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-encoding'}, 'gzip', "$name: Content-Encoding gzip");
    is($r->{headers}{vary}, 'Accept-Encoding', "$name: Vary");
    is($r->{headers}{'content-type'}, 'application/json', "$name: type");
    is($r->{headers}{'content-length'}, length $r->{content},
       "$name: Content-Length is the compressed size");
    cmp_ok(length $r->{content}, '<', length($list) / 4, "$name: compressed");
    is(gunzipped($r->{content}), $list, "$name: decompresses to the provider's bytes");
}

sub identity_ok {
    my ($r, $name, $body) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 200, "$name: 200");
    ok(!exists $r->{headers}{'content-encoding'}, "$name: no Content-Encoding");
    ok($r->{content} eq $body, "$name: the provider's bytes");
}

# ---- the copy, on a miss and on hits -----------------------------------------

my $r = $t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip');
gzip_ok($r, 'miss, gzip');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'miss, gzip: MISS');
my $gz_etag = $r->{headers}{etag};
my $gz_bytes = $r->{content};
like($gz_etag, qr/\A"[0-9a-f]{32}"\z/, 'gzip: a strong ETag');

$r = $t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip, deflate, br');
gzip_ok($r, 'hit, gzip among others');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'hit, gzip: HIT');
is($r->{headers}{etag}, $gz_etag, 'hit, gzip: the same ETag');
ok($r->{content} eq $gz_bytes, 'hit, gzip: the same compressed bytes (stored, not redone)');

$r = $t->get('/v1/models', %auth);
identity_ok($r, 'hit, no Accept-Encoding', $list);
is($r->{headers}{vary}, 'Accept-Encoding', 'identity answer of a list with a copy: Vary');
my $id_etag = $r->{headers}{etag};
isnt($id_etag, $gz_etag, 'identity and gzip: different ETags');

identity_ok($t->get('/v1/models', %auth, 'Accept-Encoding' => 'br'),
            'Accept-Encoding: br', $list);
identity_ok($t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip;q=0'),
            'Accept-Encoding: gzip;q=0', $list);

# as gzip_static: gzip_proxied (default off) refuses proxied requests
identity_ok($t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip',
                    Via => '1.1 proxy'),
            'a proxied request (Via), gzip_proxied off', $list);

# ... and gzip_disable applies
identity_ok($t->get('/no-msie', %auth, 'Accept-Encoding' => 'gzip',
                    'User-Agent' => 'Mozilla/4.0 (compatible; MSIE 6.0)'),
            'gzip_disable matches the User-Agent', $list);
gzip_ok($t->get('/no-msie', %auth, 'Accept-Encoding' => 'gzip',
                'User-Agent' => 'curl/8.0'),
        'gzip_disable does not match');

# ---- conditional requests and HEAD ---------------------------------------------

$r = $t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip',
             'If-None-Match' => $gz_etag);
is($r->{status}, 304, 'gzip + If-None-Match of the gzip ETag: 304');
is($r->{headers}{etag}, $gz_etag, '304: the gzip ETag');
is($r->{content}, '', '304: no body');

$r = $t->get('/v1/models', %auth, 'Accept-Encoding' => 'gzip',
             'If-None-Match' => $id_etag);
is($r->{status}, 200, 'gzip + If-None-Match of the identity ETag: 200');
is($r->{headers}{'content-encoding'}, 'gzip', '... with the gzip copy');

$r = $t->get('/v1/models', %auth, 'If-None-Match' => $gz_etag);
is($r->{status}, 200, 'identity + If-None-Match of the gzip ETag: 200');

$r = $t->head('/v1/models', %auth, 'Accept-Encoding' => 'gzip');
is($r->{status}, 200, 'HEAD, gzip: 200');
is($r->{headers}{'content-encoding'}, 'gzip', 'HEAD, gzip: Content-Encoding');
is($r->{headers}{'content-length'}, length $gz_bytes, 'HEAD, gzip: the copy\'s length');
is($r->{content}, '', 'HEAD: no body');

# ---- no copy: derived answers, a list gzip would not shrink, over max_entry ----

$r = $t->get('/v1/models?q=gpt-4o&limit=3', %auth, 'Accept-Encoding' => 'gzip');
is($r->{status}, 200, 'filter variant, gzip accepted: 200');
ok(!exists $r->{headers}{'content-encoding'},
   'filter variant: identity (no copy, gzip filter off)');
is(scalar @{ MCTest::json_decode($r->{content})->{data} }, 3, 'filter variant: 3 models');

my $tiny = $t->fixture('adv_empty_list.json');
for (1 .. 2) {
    $r = $t->get('/tiny', %auth, 'Accept-Encoding' => 'gzip');
    identity_ok($r, "a 37-byte list ($_): no gzip copy", $tiny);
    ok(!exists $r->{headers}{vary}, "a 37-byte list ($_): no Vary");
}

my $big = $t->fixture('openrouter_models.json');
$r = $t->get('/big', %auth, 'Accept-Encoding' => 'gzip');
identity_ok($r, 'a list over max_entry, not stored: identity', $big);

# ---- what reached the provider, what the zone did ---------------------------------

is($t->mock_count('/v1/models'), 1, 'one fetch of the list for all of the above');
is($t->mock_count('/tiny'), 1, 'one fetch of the tiny list');

my $s = MCTest::json_decode($t->get('/stats')->{content});
is($s->{upstream_fetches}, 3, 'stats: 3 fetches');
is($s->{entries}, 2, 'stats: 2 entries (the big list is not stored)');

$t->done_testing;
