#!/usr/bin/perl

# Reload (SIGHUP): a zone whose name and size are unchanged keeps its entries
# and counters across new workers, even when ttl, max_entry, inactive and
# the locations change; a new zone size starts an empty zone; a broken
# config leaves the old one serving; several reloads under load lose no
# request.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

# %%SIZE%%, %%ZONE_ARGS%%, %%TTL%% and %%EXTRA%% vary between the configs
sub conf {
    my (%v) = @_;
    my $text = <<'EOF';
    modelcache_zone zone=models:%%SIZE%% %%ZONE_ARGS%%;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache      %%ZONE%%;
            modelcache_pass /_p/v1/models;
            modelcache_ttl  %%TTL%%;
        }

        location = /api/tags {
            modelcache      models;
            modelcache_pass /_p/api/tags;
            modelcache_ttl  %%TTL%%;
        }

        location = /stats {
            modelcache_stats models;
        }

%%EXTRA%%
    }
EOF
    my %d = (SIZE => '8m', ZONE_ARGS => '', TTL => '300s', EXTRA => '', ZONE => 'models', %v);
    $text =~ s/%%(SIZE|ZONE_ARGS|TTL|EXTRA|ZONE)%%/$d{$1}/g;
    return $t->write_conf($text);
}

my @COUNTERS = qw(hits misses expired errors upstream_fetches evictions purged);

sub stats {
    my $r = $t->get('/stats');
    my $s = MCTest::json_decode($r->{content});
    die "stats: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

sub counters { my ($s) = @_; return { map { $_ => $s->{$_} } @COUNTERS, 'entries' } }

my %auth = (Authorization => 'Bearer key-a');
my %fixture = ('/v1/models' => $t->fixture('openai_models.json'),
               '/api/tags' => $t->fixture('ollama_tags.json'));

conf();
$t->run;

# ---- entries and counters survive a reload --------------------------------------

my (%etag, %stored_at);
for my $path ('/v1/models', '/api/tags') {
    my $r = $t->get($path, %auth);
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$path: MISS");
    $etag{$path} = $r->{headers}{etag};
    $stored_at{$path} = time;
    $r = $t->get($path, %auth);
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "$path: HIT");
}
is($t->mock_total, 2, 'two provider fetches');
my $before = stats();
is_deeply(counters($before),
          { hits => 2, misses => 2, expired => 0, errors => 0, upstream_fetches => 2,
            evictions => 0, purged => 0, entries => 2 },
          'counters before the reload');

sleep 2.5;
my %old_workers = map { $_ => 1 } $t->worker_pids;
$t->reload;
ok(!grep({ $old_workers{$_} } $t->worker_pids), 'reload: new workers');

for my $path ('/v1/models', '/api/tags') {
    my $r = $t->get($path, %auth);
    my $elapsed = time - $stored_at{$path};
    is($r->{status}, 200, "after reload: $path 200");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "after reload: $path HIT");
    ok(!$old_workers{ $r->{headers}{'x-worker'} }, "after reload: $path served by a new worker");
    is($r->{headers}{etag}, $etag{$path}, "after reload: $path same ETag");
    ok($r->{content} eq $fixture{$path}, "after reload: $path same body");
    cmp_ok($r->{headers}{age}, '>=', int($elapsed) - 1, "after reload: $path Age continues")
        or diag("elapsed $elapsed");
    cmp_ok($r->{headers}{age}, '<=', $elapsed + 1, "after reload: $path Age not beyond the time passed");
    cmp_ok($r->{headers}{age}, '>=', 1, "after reload: $path Age not reset to 0");
}
is($t->mock_total, 2, 'after reload: no new fetch');
is_deeply(counters(stats()), { %{ counters($before) }, hits => 4 },
          'after reload: counters continue (2 more hits, nothing reset)');

# ---- a changed config that keeps the zone's name and size ------------------------------

conf(ZONE_ARGS => 'max_entry=1m inactive=10m', TTL => '600s', EXTRA => <<'EOF');
        location = /new/v1/models {
            modelcache      models;
            modelcache_pass /_p/lmstudio/v1/models;
            modelcache_ttl  30s;
        }
EOF
$t->reload;

for my $path ('/v1/models', '/api/tags') {
    my $r = $t->get($path, %auth);
    is($r->{headers}{'x-modelcache-status'}, 'HIT',
       "changed ttl/max_entry/inactive: $path still HIT");
    is($r->{headers}{etag}, $etag{$path}, "changed config: $path same ETag");
}
my $r = $t->get('/new/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'added location: MISS');
$r = $t->get('/new/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'added location: HIT');
ok($r->{content} eq $t->fixture('lmstudio_v1_models.json'), 'added location: its list');
is($t->mock_total, 3, 'changed config: one new fetch, for the new location only');
is_deeply(counters(stats()),
          { %{ counters($before) }, hits => 7, misses => 3, upstream_fetches => 3, entries => 3 },
          'changed config: counters continue');

# ---- a broken config: the old one keeps running ------------------------------------------

my @workers = $t->worker_pids;
conf(ZONE => 'nope');
my ($code, $out) = $t->nginx_test;
isnt($code, 0, 'broken config: nginx -t fails');
kill 'HUP', $t->master_pid or die "HUP: $!";
ok($t->wait_for(sub { $t->error_log =~ /\[emerg\][^\n]*uses unknown modelcache zone "nope"/ }, 10),
   'broken config: the reload logs the [emerg]');
sleep 0.5;
is_deeply([ $t->worker_pids ], \@workers, 'broken config: the old workers go on');
for my $path ('/v1/models', '/api/tags') {
    $r = $t->get($path, %auth);
    is($r->{status}, 200, "broken config: $path 200");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "broken config: $path still HIT");
}
$r = $t->get('/new/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'broken config: the old config\'s location serves');
is($t->mock_total, 3, 'broken config: no new fetch');

# ---- several reloads, requests between them and during them ----------------------------------

conf();
my $s0 = stats();
my ($sent, $ok) = (0, 0);
for my $round (1 .. 4) {
    $t->reload;
    my $res = $t->parallel(12, sub {
        my $r = $t->get($_[0] % 2 ? '/v1/models' : '/api/tags', %auth);
        return { status => $r->{status}, cache => $r->{headers}{'x-modelcache-status'} // '-' };
    });
    $sent += 12;
    $ok += grep { $_ && $_->{status} == 200 && $_->{cache} eq 'HIT' } @$res;
}
is($ok, $sent, "reloads in a row: all $sent requests between them 200 HIT");

# a child sends the HUPs while the others keep asking
my $clients = 6;
my $per_client = 25;
my $res = $t->parallel($clients + 1, sub {
    my ($i) = @_;
    if ($i == $clients) {
        my $done = 0;
        for (1 .. 3) {
            $t->reload;
            $done++;
            sleep 0.2;
        }
        return { reloads => $done };
    }
    my @st;
    for my $k (1 .. $per_client) {
        my $r = $t->get($k % 2 ? '/v1/models' : '/api/tags', %auth);
        push @st, "$r->{status} " . ($r->{headers}{'x-modelcache-status'} // '-');
        sleep 0.03;
    }
    return { statuses => \@st };
}, timeout => 90);
is($res->[$clients] && $res->[$clients]{reloads}, 3, 'three reloads during the load');
my @st = map { @{ $_ ? $_->{statuses} : [] } } @$res[0 .. $clients - 1];
is(scalar(@st), $clients * $per_client, 'every client finished');
is_deeply([ grep { $_ ne '200 HIT' } @st ], [], 'during reloads: every request 200 HIT');
is($t->mock_total, 3, 'reloads: no new fetch');
is_deeply(counters(stats()),
          { %{ counters($s0) }, hits => $s0->{hits} + $sent + $clients * $per_client + 0 },
          'reloads: every hit counted once, across all the workers');

# ---- a new zone size: a new, empty zone ------------------------------------------------------

conf(SIZE => '16m');
$t->reload;
my $s = stats();
is($s->{size}, 16 * 1024 * 1024, 'new size: the zone has it');
is($s->{entries}, 0, 'new size: no entries');
is_deeply(counters($s), { map { $_ => 0 } @COUNTERS, 'entries' },
          'new size: counters start from 0');
$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'new size: the next request is a MISS');
ok($r->{content} eq $fixture{'/v1/models'}, 'new size: the list');
is($t->mock_total, 4, 'new size: fetched again');
$r = $t->get('/v1/models', %auth);
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'new size: then HIT');
is_deeply(counters(stats()),
          { (map { $_ => 0 } @COUNTERS), misses => 1, hits => 1, upstream_fetches => 1,
            entries => 1 },
          'new size: counting from scratch');

$t->done_testing(allow => [qr/unknown modelcache zone "nope"/]);
