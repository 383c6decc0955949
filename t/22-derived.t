#!/usr/bin/perl

# Derived answers (lookups, filter variants) live with their list entry:
# stored once, served as stored, dropped when the list is purged or
# replaced, and held to the list's budget (4 x its size + 64 KB, the
# oldest making room) so that clients' variants cannot push lists out.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:32m;

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
            modelcache_bypass $arg_nocache;
        }

        location ~ ^/v1/models/(?<id>.+)$ {
            modelcache        models;
            modelcache_pass   /_provider/v1/models;
            modelcache_lookup $id;
        }

        # a small list first, a 1 MB one second
        location = /merged {
            modelcache      models;
            modelcache_pass /_provider/api/tags provider=ollama;
            modelcache_pass /_provider/openrouter/api/v1/models provider=openrouter;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

my %auth = (Authorization => 'Bearer key-a');
my @ids = map { $_->{id} }
          @{ MCTest::json_decode($t->fixture('openai_models.json'))->{data} };
my $list_size = length $t->fixture('openai_models.json');

sub stats { MCTest::json_decode($t->get('/stats')->{content}) }

sub get_ok {
    my ($path, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $r = $t->get($path, %auth);
    is($r->{status}, 200, "$name: 200") or diag($r->{content});
    return $r;
}

is(get_ok('/v1/models', 'the list')->{headers}{'x-modelcache-status'}, 'MISS',
   'the list: MISS');

# ---- every model looked up: all kept (small), all served as stored ---------------

my $s0 = stats();
get_ok("/v1/models/$_", "lookup $_") for @ids;
my $s1 = stats();
is($s1->{derived_builds} - $s0->{derived_builds}, scalar @ids,
   'each lookup built once');
is($s1->{derived}, scalar @ids, 'all lookups kept');

get_ok("/v1/models/$_", "lookup $_ again") for @ids;
my $s2 = stats();
is($s2->{derived_builds}, $s1->{derived_builds}, 'lookups again: nothing rebuilt');
is($s2->{derived_hits} - $s1->{derived_hits}, scalar @ids,
   'lookups again: each a derived hit');

# ---- large variants: held to the budget, the oldest going first ---------------------

# pages of 20 .. 114 models: together far more than 4 x the list + 64 KB
my @limits = (20 .. scalar @ids);
my $bytes = 0;
$bytes += length(get_ok("/v1/models?sort=-created&limit=$_", "limit=$_")->{content})
    for @limits;
my $budget = 4 * $list_size + 65536;
cmp_ok($bytes, '>', 2 * $budget, "the variants ($bytes B) exceed the budget ($budget B)");

my $s3 = stats();
is($s3->{derived_builds} - $s2->{derived_builds}, scalar @limits,
   'each variant built once');
cmp_ok($s3->{derived}, '<', $s2->{derived} + @limits, 'not all variants kept');
cmp_ok($s3->{evictions}, '>', $s2->{evictions}, 'the oldest were evicted');

get_ok('/v1/models?sort=-created&limit=' . $limits[-1], 'the newest variant again');
my $s4 = stats();
is($s4->{derived_builds}, $s3->{derived_builds}, 'the newest variant: still stored');

get_ok('/v1/models/' . $ids[0], 'the first lookup again');
my $s5 = stats();
is($s5->{derived_builds}, $s4->{derived_builds} + 1,
   'the first lookup (the oldest answer) made room: rebuilt');

is(get_ok('/v1/models', 'the list after all that')->{headers}{'x-modelcache-status'},
   'HIT', 'the list itself stays: HIT');
is($t->mock_count('/v1/models'), 1, 'one fetch for all of the above');

# ---- replaced or purged: the derived answers go with the list ---------------------

cmp_ok($s5->{derived}, '>', 0, 'derived answers stored before the refresh');
is(get_ok('/v1/models?nocache=1', 'a refresh')->{headers}{'x-modelcache-status'},
   'BYPASS', 'a refresh: BYPASS');
is(stats()->{derived}, 0, 'the refreshed list replaced the entry: no derived answer left');
is($t->mock_count('/v1/models'), 2, 'the refresh fetched');

get_ok('/v1/models/' . $ids[1], 'a lookup of the new list');
get_ok('/v1/models?q=gpt', 'a filter of the new list');
is(stats()->{derived}, 2, 'two derived answers of the new list');

my $r = $t->http('DELETE', '/purge');
is($r->{content}, qq({"purged":1}\n), 'purge: one entry (derived answers are not entries)');
is(stats()->{derived}, 0, 'purged: its derived answers went with it');
is(stats()->{entries}, 0, 'purged: no entry');

# ---- a merge is kept with its largest list, within that list's budget -------------

my $m1 = get_ok('/merged', 'merged, cold');
is($m1->{headers}{'x-modelcache-status'}, 'MISS', 'merged, cold: MISS');
cmp_ok(length $m1->{content}, '>', 1_000_000, 'merged: over 1 MB');

my $s6 = stats();
my $m2 = get_ok('/merged', 'merged, warm');
my $s7 = stats();
is($s7->{derived_builds} - $s6->{derived_builds}, 1, 'merged, warm: built once');

my $m3 = get_ok('/merged', 'merged, again');
my $s8 = stats();
is($s8->{derived_builds}, $s7->{derived_builds},
   'merged, again: not rebuilt (kept with the 1 MB list, not the 6 KB one)');
is($s8->{derived_hits} - $s7->{derived_hits}, 1, 'merged, again: a derived hit');
ok($m3->{content} eq $m1->{content} && $m2->{content} eq $m1->{content},
   'merged: the same bytes each time');

$t->done_testing;
