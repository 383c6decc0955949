#!/usr/bin/perl

# Stats: the JSON document of a zone (size, used, entries and every counter),
# how each request is counted (HIT, MISS, EXPIRED, ERROR, fetches, purges),
# the Prometheus text format (?format=prometheus or Accept: text/plain),
# format errors, methods, HEAD, two zones kept apart and counters shared by
# both workers.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use Time::HiRes qw(sleep);

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    # plain TTL expiry: no stale answers here (t/11-stale.t has those)
    modelcache_stale_while_revalidate 0;
    modelcache_stale_if_error         0;

    modelcache_zone zone=models:8m;
    modelcache_zone zone=other:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  5s;
        }

        location = /fail/v1/models {
            modelcache      models;
            modelcache_pass /_p/fail/v1/models;
        }

        location = /invalid/v1/models {
            modelcache      models;
            modelcache_pass /_p/invalid/v1/models;
        }

        location = /openrouter/api/v1/models {
            modelcache      models;
            modelcache_pass /_p/openrouter/api/v1/models;
        }

        location = /other/v1/models {
            modelcache      other;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  300s;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }

        location = /other/stats {
            modelcache_stats other;
        }
    }
EOF
$t->run;

my @FIELDS = qw(zone size used entries hits misses expired stale updating bypass
                errors upstream_fetches evictions purged lock_waits derived
                derived_builds derived_hits);
my @COUNTERS = qw(hits misses expired stale updating bypass errors upstream_fetches
                  evictions purged lock_waits derived_builds derived_hits);
my %GAUGE = (size => 'modelcache_zone_size_bytes', used => 'modelcache_zone_used_bytes',
             entries => 'modelcache_entries', derived => 'modelcache_derived_entries');

sub stats {
    my ($loc) = @_;
    my $r = $t->get($loc // '/stats');
    my $s = MCTest::json_decode($r->{content});
    die "stats: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

# the counters of a zone as expected, compared field by field
my %want = map { $_ => 0 } @COUNTERS;

sub counters_are {
    my ($name, $s, %w) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is_deeply({ map { $_ => $s->{$_} } @COUNTERS }, { %want, %w }, "$name: counters")
        or diag(explain($s));
}

# ---- a fresh zone --------------------------------------------------------------

my $r = $t->get('/stats');
is($r->{status}, 200, 'fresh: 200');
is($r->{headers}{'content-type'}, 'application/json', 'fresh: application/json');
my @keys = $r->{content} =~ /"(\w+)":/g;
is_deeply(\@keys, \@FIELDS, 'JSON fields, in order');
like($r->{content}, qr/\A\{"zone":"models"(,"\w+":\d+){17}\}\n\z/,
     'one JSON object, integer values');
my $fresh = MCTest::json_decode($r->{content});
is($fresh->{zone}, 'models', 'fresh: zone name');
is($fresh->{size}, 8 * 1024 * 1024, 'fresh: size is the declared 8m in bytes');
cmp_ok($fresh->{used}, '>', 0, 'fresh: used > 0');
cmp_ok($fresh->{used}, '<', $fresh->{size}, 'fresh: used < size');
is($fresh->{entries}, 0, 'fresh: no entries');
counters_are('fresh', $fresh);

my $other = stats('/other/stats');
is($other->{zone}, 'other', 'other zone: its name');
is($other->{size}, 1024 * 1024, 'other zone: size 1m');
is($other->{entries}, 0, 'other zone: no entries');
counters_are('other zone fresh', $other);

# ---- MISS then HITs ---------------------------------------------------------------

my %auth = (Authorization => 'Bearer key-a');
$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'first request: MISS');
for my $i (1 .. 3) {
    $r = $t->get('/v1/models', %auth);
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "request $i after: HIT");
}
is($t->mock_count('/v1/models'), 1, 'one provider fetch');
my $s = stats();
%want = (%want, misses => 1, hits => 3, upstream_fetches => 1);
counters_are('1 MISS + 3 HIT', $s);
is($s->{entries}, 1, '1 MISS + 3 HIT: 1 entry');
cmp_ok($s->{used}, '>', $fresh->{used}, 'one entry: used grew');

# ---- EXPIRED (ttl 5s) -------------------------------------------------------------

sleep 6.2;
$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'EXPIRED', 'after the ttl: EXPIRED');
is($t->mock_count('/v1/models'), 2, 'EXPIRED: fetched again');
$s = stats();
%want = (%want, expired => 1, upstream_fetches => 2);
counters_are('EXPIRED', $s);
is($s->{entries}, 1, 'EXPIRED: still 1 entry (replaced)');

# ---- errors ------------------------------------------------------------------------

$t->mock_route({ path => '/fail/v1/models', status => 500,
                 body => '{"error":{"message":"boom","type":"server_error"}}' });
$r = $t->get('/fail/v1/models', %auth);
is($r->{status}, 500, 'provider 500: relayed');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', 'provider 500: ERROR');
%want = (%want, errors => 1, upstream_fetches => 3);
counters_are('provider 500', stats());

$t->mock_route({ path => '/invalid/v1/models', fixture => 'adv_invalid_json.json' });
$r = $t->get('/invalid/v1/models', %auth);
is($r->{status}, 502, 'invalid JSON 200: 502');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', 'invalid JSON 200: ERROR');
%want = (%want, errors => 2, upstream_fetches => 4);
$s = stats();
counters_are('invalid JSON 200', $s);
is($s->{entries}, 1, 'errors store nothing');

# ---- used grows with a 1 MB entry ------------------------------------------------------

my $used_before = $s->{used};
$r = $t->get('/openrouter/api/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'OpenRouter list: MISS');
ok($r->{content} eq $t->fixture('openrouter_models.json'), 'OpenRouter list: 1 MB body');
$s = stats();
%want = (%want, misses => 2, upstream_fetches => 5);
counters_are('OpenRouter MISS', $s);
is($s->{entries}, 2, 'OpenRouter MISS: 2 entries');
cmp_ok($s->{used} - $used_before, '>=', 1_000_000, 'used grew by at least 1,000,000 bytes');
cmp_ok($s->{used}, '<', $s->{size}, 'used still < size');

# ---- purge counts -----------------------------------------------------------------------

$r = $t->http('PURGE', '/purge');
is($r->{content}, "{\"purged\":2}\n", 'purge: 2 entries');
$s = stats();
%want = (%want, purged => 2);
counters_are('after purge', $s);
is($s->{entries}, 0, 'after purge: no entries');
is($s->{used}, $fresh->{used}, 'after purge: used is back to the empty zone\'s');

$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'after purge: MISS');
$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'then HIT');
%want = (%want, misses => 3, hits => 4, upstream_fetches => 6);
$s = stats();
counters_are('after purge, MISS + HIT', $s);
is($s->{entries}, 1, 'after purge, MISS + HIT: 1 entry');

# ---- Prometheus -----------------------------------------------------------------------------

# name => { help, type, zone, value } of a text exposition; undef if malformed
sub parse_prometheus {
    my ($text) = @_;
    my (%m, @bad);
    for my $line (split /\n/, $text) {
        if ($line =~ /^# HELP (\w+) (\S.*)$/) {
            push @bad, "second HELP: $line" if exists $m{$1}{help};
            $m{$1}{help} = $2;
        } elsif ($line =~ /^# TYPE (\w+) (counter|gauge)$/) {
            push @bad, "TYPE before HELP: $line" unless exists $m{$1}{help};
            $m{$1}{type} = $2;
        } elsif ($line =~ /^(\w+)\{zone="([^"\\]*)"\} (\d+)$/) {
            push @bad, "sample before TYPE: $line" unless exists $m{$1}{type};
            push @bad, "second sample: $line" if exists $m{$1}{value};
            $m{$1}{zone} = $2;
            $m{$1}{value} = $3;
        } else {
            push @bad, "unexpected line: $line";
        }
    }
    return (\%m, \@bad);
}

sub prometheus_matches_json {
    my ($name, $r, $json, $zone) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'text/plain; version=0.0.4; charset=utf-8',
       "$name: Prometheus content type");
    like($r->{content}, qr/\n\z/, "$name: ends with a newline");
    my ($m, $bad) = parse_prometheus($r->{content});
    is_deeply($bad, [], "$name: every line is HELP, TYPE or a sample");

    my %expect;
    for my $f (keys %GAUGE) {
        $expect{ $GAUGE{$f} } = { type => 'gauge', zone => $zone, value => $json->{$f} };
    }
    for my $c (@COUNTERS) {
        $expect{"modelcache_${c}_total"} = { type => 'counter', zone => $zone,
                                              value => $json->{$c} };
    }
    my %got = map { $_ => { type => $m->{$_}{type}, zone => $m->{$_}{zone},
                            value => $m->{$_}{value} } } keys %$m;
    is_deeply(\%got, \%expect,
              "$name: 4 gauges, 13 _total counters, zone label, the JSON's values")
        or diag($r->{content});
    is(scalar(grep { length($m->{$_}{help} // '') } keys %$m), 17, "$name: each has # HELP text");
    is(scalar(grep { /_total$/ && $m->{$_}{type} ne 'counter' } keys %$m), 0,
       "$name: every _total is a counter");
    is(scalar(grep { !/_total$/ && $m->{$_}{type} ne 'gauge' } keys %$m), 0,
       "$name: every other metric is a gauge");
}

my $json = stats();
prometheus_matches_json('?format=prometheus', $t->get('/stats?format=prometheus'),
                        $json, 'models');
prometheus_matches_json('Accept: text/plain', $t->get('/stats', Accept => 'text/plain'),
                        $json, 'models');
prometheus_matches_json('Accept with text/plain among others',
                        $t->get('/stats', Accept => 'application/openmetrics-text;q=0.9, text/plain;version=0.0.4;q=0.5'),
                        $json, 'models');
prometheus_matches_json('other zone, ?format=prometheus',
                        $t->get('/other/stats?format=prometheus'),
                        stats('/other/stats'), 'other');

$r = $t->get('/stats?format=json', Accept => 'text/plain');
is($r->{headers}{'content-type'}, 'application/json', '?format=json wins over Accept');
is_deeply(MCTest::json_decode($r->{content}), $json, '?format=json: the JSON document');

$r = $t->get('/stats', Accept => 'application/json');
is($r->{headers}{'content-type'}, 'application/json', 'Accept: application/json: JSON');

for my $f ('xml', 'PROMETHEUS', '') {
    $r = $t->get("/stats?format=$f");
    is($r->{status}, 400, "?format=$f: 400");
    is($r->{headers}{'content-type'}, 'application/json', "?format=$f: JSON error");
    my $e = MCTest::json_decode($r->{content});
    is($e && $e->{error}{type}, 'modelcache_bad_request', "?format=$f: modelcache_bad_request");
}

# ---- methods ------------------------------------------------------------------------------

for my $m (qw(POST PUT DELETE PURGE)) {
    $r = $t->http($m, '/stats', body => '{}');
    is($r->{status}, 405, "$m on stats: 405");
    is($r->{headers}{allow}, 'GET, HEAD', "$m on stats: Allow: GET, HEAD");
    my $e = MCTest::json_decode($r->{content});
    is($e && $e->{error}{type}, 'modelcache_method_not_allowed', "$m on stats: JSON error");
}
is(stats()->{entries}, 1, 'DELETE/PURGE on stats purged nothing');

my $get = $t->get('/stats');
$r = $t->head('/stats');
is($r->{status}, 200, 'HEAD: 200');
is($r->{content}, '', 'HEAD: no body');
is($r->{headers}{'content-type'}, 'application/json', 'HEAD: content type');
is($r->{headers}{'content-length'}, length $get->{content}, 'HEAD: content length of the GET');

# reading the stats counts nothing
counters_are('after reading the stats many times', stats());

# ---- two zones, counters shared by both workers ---------------------------------------------

my $models_before = stats();
my $other_before = stats('/other/stats');
counters_are('other zone untouched by the models zone\'s traffic', $other_before,
             map { $_ => 0 } @COUNTERS);

$t->mock_reset;
$r = $t->get('/other/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'other zone: MISS');

my $n = 60;
my $res = $t->parallel($n, sub {
    my $r = $t->get('/other/v1/models', %auth);
    return { status => $r->{status}, cache => $r->{headers}{'x-modelcache-status'} // '-',
             worker => $r->{headers}{'x-worker'} // '-' };
});
is(scalar(grep { $_ && $_->{status} == 200 && $_->{cache} eq 'HIT' } @$res), $n,
   "other zone: $n parallel HITs");
my %workers = map { $_->{worker} => 1 } grep { $_ } @$res;
is(scalar(keys %workers), 2, 'the hits were served by both workers');
is($t->mock_count('/v1/models'), 1, 'other zone: one fetch');

my $os = stats('/other/stats');
is($os->{entries}, 1, 'other zone: 1 entry');
counters_are('other zone: counters of both workers add up', $os,
             (map { $_ => 0 } @COUNTERS), hits => $n, misses => 1, upstream_fetches => 1);
my $ms = stats();
is_deeply({ map { $_ => $ms->{$_} } @COUNTERS, 'entries', 'used' },
          { map { $_ => $models_before->{$_} } @COUNTERS, 'entries', 'used' },
          'models zone: unchanged by the other zone\'s traffic');

$t->done_testing;
