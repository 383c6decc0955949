#!/usr/bin/perl

# TTL and inactive: a fresh entry is a HIT, an expired one is refetched
# (EXPIRED) and replaced; modelcache_ttl is inherited from http and server
# level and overridden per location; an expired entry whose refetch fails
# is relayed as ERROR and left for the next request; entries unread for
# "inactive" are dropped when another entry is stored.

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
    log_format mc '$request_uri $status $modelcache_status $modelcache_age';
    access_log %%DIR%%/mc.log mc;

    # plain TTL expiry: no stale answers here (t/11-stale.t has those)
    modelcache_stale_while_revalidate 0;
    modelcache_stale_if_error         0;

    modelcache_zone zone=models:8m;
    modelcache_zone zone=lazy:1m inactive=2s;

    modelcache_ttl 45s;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        modelcache_ttl 30s;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /stamp/v1/models {
            modelcache      models;
            modelcache_pass /_provider/stamp/v1/models;
            modelcache_ttl  2s;
        }

        location = /fail/v1/models {
            modelcache      models;
            modelcache_pass /_provider/fail/v1/models;
            modelcache_ttl  2s;
        }

        location = /inherit/v1/models {
            modelcache      models;
            modelcache_pass /_provider/v1/models?loc=inherit;
        }

        location = /override/v1/models {
            modelcache      models;
            modelcache_pass /_provider/v1/models?loc=override;
            modelcache_ttl  90s;
        }

        location /lazy/ {
            modelcache      lazy;
            modelcache_pass /_provider$uri;
            modelcache_ttl  300s;
        }

        location = /stats {
            modelcache_stats models;
        }

        location = /stats-lazy {
            modelcache_stats lazy;
        }
    }

    server {
        listen 127.0.0.1:%%PORT2%%;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /http/v1/models {
            modelcache      models;
            modelcache_pass /_provider/v1/models?loc=http;
        }
    }
EOF
$t->run;

my $openai = $t->fixture('openai_models.json');
my $lmstudio = $t->fixture('lmstudio_v1_models.json');
my %auth = (Authorization => 'Bearer key-a');

$t->mock_route({ path => '/stamp/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp' });

sub stats {
    my ($loc) = @_;
    my $r = $t->get($loc // '/stats');
    my $s = MCTest::json_decode($r->{content});
    die "stats $loc: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

# counter deltas of the "models" zone since $before
sub delta {
    my ($before) = @_;
    my $now = stats();
    return { map { $_ => $now->{$_} - $before->{$_} }
             qw(hits misses expired errors upstream_fetches) };
}

sub seq_of {
    my ($body) = @_;
    my $j = MCTest::json_decode($body);
    return ref $j eq 'HASH' ? $j->{mock_seq} : undef;
}

# ---- ttl 2s: MISS, HIT, EXPIRED with a new body, HIT on the new body -------

my $s0 = stats();

my $r = $t->get('/stamp/v1/models', %auth);
is($r->{status}, 200, 'ttl: first request 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'ttl: first request MISS');
is($r->{headers}{'cache-control'}, 'private, max-age=2',
   'ttl: max-age is the ttl on a fresh fetch');
is($r->{headers}{age}, 0, 'ttl: age 0 on the miss');
my $body1 = $r->{content};
my $seq1 = seq_of($body1);
ok(defined $seq1, 'ttl: the body carries the mock\'s mock_seq');
is($t->mock_count('/stamp/v1/models'), 1, 'ttl: one fetch after the miss');

$r = $t->get('/stamp/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'ttl: second request HIT');
ok($r->{content} eq $body1, 'ttl: the hit serves the stored body');
like($r->{headers}{'cache-control'}, qr/^private, max-age=[12]$/,
     'ttl: max-age on the hit is what is left of 2s');
is($t->mock_count('/stamp/v1/models'), 1, 'ttl: still one fetch after the hit');

sleep 3.2;    # the second counter has advanced by at least 3 > ttl

$r = $t->get('/stamp/v1/models', %auth);
is($r->{status}, 200, 'ttl: after expiry 200');
is($r->{headers}{'x-modelcache-status'}, 'EXPIRED', 'ttl: after expiry EXPIRED');
is($t->mock_count('/stamp/v1/models'), 2, 'ttl: the expired entry was refetched');
my $body2 = $r->{content};
my $seq2 = seq_of($body2);
ok(defined $seq2 && $seq2 > $seq1, "ttl: new body (mock_seq $seq1 -> "
   . ($seq2 // 'none') . ')');
ok($body2 ne $body1, 'ttl: the refetched body differs from the old one');
is($r->{headers}{age}, 0, 'ttl: age back to 0 after the refetch');
is($r->{headers}{'cache-control'}, 'private, max-age=2',
   'ttl: max-age is the ttl again after the refetch');
isnt($r->{headers}{etag}, undef, 'ttl: refetch has an etag');
my $etag2 = $r->{headers}{etag};

$r = $t->get('/stamp/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'ttl: after the refetch HIT');
ok($r->{content} eq $body2, 'ttl: the hit serves the new body');
is($r->{headers}{etag}, $etag2, 'ttl: with the new body\'s etag');
cmp_ok($r->{headers}{age}, '<=', 1, 'ttl: age of the new entry is small');
is($t->mock_count('/stamp/v1/models'), 2, 'ttl: no fetch for the hit');

is_deeply(delta($s0),
          { hits => 2, misses => 1, expired => 1, errors => 0,
            upstream_fetches => 2 },
          'ttl: stats counted 2 hits, 1 miss, 1 expired, 2 fetches');

# ---- ttl inheritance: http 45s, server 30s, location 90s ------------------

$t->mock_reset;

$r = $t->get('/inherit/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'inherit: MISS');
is($r->{headers}{'cache-control'}, 'private, max-age=30',
   'inherit: server-level ttl 30s');
ok($r->{content} eq $openai, 'inherit: body');

$r = $t->get('/override/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'override: MISS');
is($r->{headers}{'cache-control'}, 'private, max-age=90',
   'override: location-level ttl 90s');

$r = $t->http('GET', '/http/v1/models', headers => \%auth, port => $t->port2);
is($r->{status}, 200, 'http level: 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'http level: MISS');
is($r->{headers}{'cache-control'}, 'private, max-age=45',
   'http level: http-level ttl 45s in a server without one');

is($t->mock_count('/v1/models'), 3, 'inheritance: three keys, three fetches');
my @q = sort map { $_->{query} } @{ $t->mock_stats->{requests} };
is_deeply(\@q, [qw(loc=http loc=inherit loc=override)],
          'inheritance: each pass URI (with its args) was fetched once');

$r = $t->get('/inherit/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'inherit: HIT');
like($r->{headers}{'cache-control'}, qr/^private, max-age=(2[89]|30)$/,
     'inherit: max-age on the hit counts down from 30');
$r = $t->get('/override/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'override: HIT');
like($r->{headers}{'cache-control'}, qr/^private, max-age=(8[89]|90)$/,
     'override: max-age on the hit counts down from 90');
$r = $t->http('GET', '/http/v1/models', headers => \%auth, port => $t->port2);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'http level: HIT');
like($r->{headers}{'cache-control'}, qr/^private, max-age=(4[34]|45)$/,
     'http level: max-age on the hit counts down from 45');
is($t->mock_count('/v1/models'), 3, 'inheritance: no fetch for the hits');

# ---- an expired entry whose refetch fails -----------------------------------

$t->mock_reset;
$t->mock_route({ path => '/fail/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp' });

$r = $t->get('/fail/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'refetch fails: first MISS');
my $fbody1 = $r->{content};
my $fseq1 = seq_of($fbody1);
is($t->mock_count('/fail/v1/models'), 1, 'refetch fails: one fetch');

sleep 3.2;

my $boom = '{"error":{"message":"provider exploded","type":"server_error"}}';
$t->mock_route({ path => '/fail/v1/models', status => 500, body => $boom,
                 headers => { 'Retry-After' => '7' }, times => 1 });
my $s1 = stats();

$r = $t->get('/fail/v1/models', %auth);
is($r->{status}, 500, 'refetch fails: the provider\'s 500 is relayed');
is($r->{content}, $boom, 'refetch fails: with the provider\'s body');
is($r->{headers}{'content-type'}, 'application/json',
   'refetch fails: and its content type');
is($r->{headers}{'retry-after'}, '7', 'refetch fails: Retry-After relayed');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', 'refetch fails: ERROR');
is($t->mock_count('/fail/v1/models'), 2, 'refetch fails: the refetch reached the mock');

# the expired entry was left in place: the next request finds it, EXPIRED
$r = $t->get('/fail/v1/models', %auth);
is($r->{status}, 200, 'after the failed refetch: 200');
is($r->{headers}{'x-modelcache-status'}, 'EXPIRED',
   'after the failed refetch: EXPIRED (the old entry stayed)');
my $fseq3 = seq_of($r->{content});
ok(defined $fseq3 && defined $fseq1 && $fseq3 > $fseq1,
   'after the failed refetch: a newer body');
is($r->{headers}{'cache-control'}, 'private, max-age=2',
   'after the failed refetch: max-age is the ttl');
is($t->mock_count('/fail/v1/models'), 3, 'after the failed refetch: fetched again');
my $fbody3 = $r->{content};

$r = $t->get('/fail/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'after the good refetch: HIT');
ok($r->{content} eq $fbody3, 'after the good refetch: the new body is served');
is($t->mock_count('/fail/v1/models'), 3, 'after the good refetch: no fetch');

is_deeply(delta($s1),
          { hits => 1, misses => 0, expired => 1, errors => 1,
            upstream_fetches => 2 },
          'refetch fails: stats counted 1 error, 1 expired, 1 hit');

# ---- inactive=2s: an entry unread for 2s goes when another is stored -------

$t->mock_reset;
for my $p (qw(/lazy/a/v1/models /lazy/b/v1/models)) {
    $t->mock_route({ path => $p, fixture => 'lmstudio_v1_models.json' });
}

$r = $t->get('/lazy/a/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'inactive: A stored (MISS)');
ok($r->{content} eq $lmstudio, 'inactive: A body');
is($r->{headers}{'cache-control'}, 'private, max-age=300', 'inactive: A ttl 300s');
my $l = stats('/stats-lazy');
is($l->{entries}, 1, 'inactive: one entry');
is($l->{evictions}, 0, 'inactive: no eviction yet');

sleep 3.2;    # A unread for more than inactive=2s, yet fresh (ttl 300s)

$r = $t->get('/lazy/b/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'inactive: B stored (MISS)');

$l = stats('/stats-lazy');
is($l->{entries}, 1, 'inactive: storing B dropped A: one entry');
cmp_ok($l->{evictions}, '>=', 1, 'inactive: counted as an eviction');

$r = $t->get('/lazy/a/v1/models', %auth);
is($r->{status}, 200, 'inactive: A again 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS',
   'inactive: A again is a MISS, not EXPIRED (the entry is gone)');
ok($r->{content} eq $lmstudio, 'inactive: A body again');
is($t->mock_count('/lazy/a/v1/models'), 2, 'inactive: A fetched anew');
is($t->mock_count('/lazy/b/v1/models'), 1, 'inactive: B fetched once');

$r = $t->get('/lazy/b/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'inactive: B (recent) still a HIT');
$l = stats('/stats-lazy');
is($l->{entries}, 2, 'inactive: A and B stored');
is($l->{misses}, 3, 'inactive: lazy zone counted 3 misses');
is($l->{expired}, 0, 'inactive: and no expired');

# ---- the access log agrees --------------------------------------------------

$t->stop;
my @log = split /\n/, $t->read_file('mc.log') // '';
is_deeply([ map { (split / /)[2] } grep { m{^/stamp/} } @log ],
          [qw(MISS HIT EXPIRED HIT)],
          '$modelcache_status of the ttl requests, in order');
is_deeply([ map { (split / /)[1, 2] } grep { m{^/fail/} } @log ],
          [qw(200 MISS 500 ERROR 200 EXPIRED 200 HIT)],
          'status and $modelcache_status of the failed-refetch requests');

$t->done_testing;
