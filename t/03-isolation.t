#!/usr/bin/perl

# Scope and credential isolation: every credential header and every scope
# gets its own entry, also under concurrency; modelcache_credentials off and
# custom credential values; and a credential never appears in clear in the
# logs, the stats, the purge answers or the shared memory zone.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    log_format mc '$request_uri $status $modelcache_status $modelcache_key';
    access_log %%DIR%%/mc.log mc;

    modelcache_zone zone=models:8m;
    modelcache_zone zone=crowd:8m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache       models;
            modelcache_pass  /_provider/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /crowd/v1/models {
            modelcache       crowd;
            modelcache_pass  /_provider/crowd/$http_x_profile/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /shared/v1/models {
            modelcache             models;
            modelcache_pass        /_provider/shared/v1/models;
            modelcache_credentials off;
            modelcache_ttl         300s;
        }

        location = /tenant/v1/models {
            modelcache             models;
            modelcache_pass        /_provider/tenant/v1/models;
            modelcache_credentials $http_x_tenant_key;
            modelcache_ttl         300s;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }

        location = /stats-crowd {
            modelcache_stats crowd;
        }
    }
EOF
$t->run;

my $openai = $t->fixture('openai_models.json');
my $profile_b = $t->fixture('openai_models_profile_b.json');

sub list_for {
    my ($who) = @_;
    return '{"object":"list","data":[{"id":"only-for-' . $who . '"}]}';
}

sub by_auth {
    my ($auth) = @_;
    return $t->mock_stats->{by_auth}{$auth} // 0;
}

sub cache { $_[0]{headers}{'x-modelcache-status'} // '(none)' }

# ---- Authorization: key-a and key-b ------------------------------------------

my %a = (Authorization => 'Bearer key-a');
my %b = (Authorization => 'Bearer key-b');

my $r = $t->get('/v1/models', %a);
is(cache($r), 'MISS', 'key-a: MISS');
ok($r->{content} eq $openai, 'key-a: profile A list');
$r = $t->get('/v1/models', %b);
is(cache($r), 'MISS', 'key-b: MISS, not key-a\'s entry');
ok($r->{content} eq $profile_b, 'key-b: profile B list');

$r = $t->get('/v1/models', %a);
is(cache($r), 'HIT', 'key-a again: HIT');
ok($r->{content} eq $openai, 'key-a again: its own list');
$r = $t->get('/v1/models', %b);
is(cache($r), 'HIT', 'key-b again: HIT');
ok($r->{content} eq $profile_b, 'key-b again: its own list');

is(by_auth('Bearer key-a'), 1, 'key-a: one fetch');
is(by_auth('Bearer key-b'), 1, 'key-b: one fetch');

# ---- the other credential headers ---------------------------------------------

for my $h (qw(X-Api-Key Api-Key X-Goog-Api-Key)) {
    my @cred = map { lc($h) . "-secret-$_" } 1, 2;
    $t->mock_route({ path => '/v1/models', auth => $_, body => list_for($_) })
        for @cred;

    for my $c (@cred) {
        $r = $t->get('/v1/models', $h => $c);
        is(cache($r), 'MISS', "$h $c: MISS");
        is($r->{content}, list_for($c), "$h $c: its own list");
    }
    for my $c (@cred) {
        $r = $t->get('/v1/models', $h => $c);
        is(cache($r), 'HIT', "$h $c again: HIT");
        is($r->{content}, list_for($c), "$h $c again: its own list");
        is(by_auth($c), 1, "$h $c: one fetch");
    }
}

# ---- scope ------------------------------------------------------------------------

$t->mock_reset;

$r = $t->get('/v1/models', %a, 'X-Profile' => 'p1');
is(cache($r), 'MISS', 'key-a scope p1: MISS (not the unscoped entry)');
ok($r->{content} eq $openai, 'key-a scope p1: body');
$r = $t->get('/v1/models', %a, 'X-Profile' => 'p2');
is(cache($r), 'MISS', 'key-a scope p2: MISS (not p1\'s entry)');
is(by_auth('Bearer key-a'), 2, 'one fetch per scope');

$r = $t->get('/v1/models', %a, 'X-Profile' => 'p1');
is(cache($r), 'HIT', 'same scope and credential: HIT (shared)');
$r = $t->get('/v1/models', %a, 'X-Profile' => 'p2');
is(cache($r), 'HIT', 'key-a scope p2 again: HIT');
$r = $t->get('/v1/models', %b, 'X-Profile' => 'p1');
is(cache($r), 'MISS', 'key-b scope p1: MISS (not key-a\'s p1 entry)');
ok($r->{content} eq $profile_b, 'key-b scope p1: profile B list');
is($t->mock_total, 3, 'three fetches for three (credential, scope) pairs');

# ---- no credential at all ---------------------------------------------------------

$r = $t->get('/v1/models');
is($r->{status}, 200, 'no credential: 200');
is(cache($r), 'MISS', 'no credential: MISS, its own entry');
is(by_auth(''), 1, 'no credential: the provider was asked without one');
$r = $t->get('/v1/models');
is(cache($r), 'HIT', 'no credential again: HIT');
$r = $t->get('/v1/models', Authorization => '');
is(cache($r), 'HIT', 'an empty Authorization is the same as none');
$r = $t->get('/v1/models', %a);
is(cache($r), 'HIT', 'key-a still its own HIT');
is($t->mock_total, 4, 'no credential: one fetch in all');

# ---- concurrent: 60 clients, 6 (credential, scope) pairs, a fresh zone -----------

$t->mock_reset;

my @combos;
for my $cred (map { "Bearer crowd-$_" } 1 .. 3) {
    for my $scope (qw(s1 s2)) {
        my $who = "$cred\@$scope";
        push @combos, { cred => $cred, scope => $scope, body => list_for($who) };
        $t->mock_route({ path => "/crowd/$scope/v1/models", auth => $cred,
                         body => list_for($who), delay_ms => 200 });
    }
}
# a request that matched no per-auth route would get this, never a list
$t->mock_route({ path => "/crowd/$_/v1/models", status => 403,
                 body => '{"error":"no route for this credential"}' })
    for qw(s1 s2);

sub crowd_round {
    my $res = $t->parallel(60, sub {
        my ($i) = @_;
        my $c = $combos[$i % 6];
        my $r = $t->get('/crowd/v1/models', Authorization => $c->{cred},
                        'X-Profile' => $c->{scope});
        return { status => $r->{status}, cache => $r->{headers}{'x-modelcache-status'},
                 body => $r->{content} };
    });
    my ($own, $ok, %cache) = (0, 0);
    for my $i (0 .. 59) {
        my $x = $res->[$i] or next;
        $ok++ if $x->{status} == 200;
        $own++ if $x->{body} eq $combos[$i % 6]{body};
        $cache{ $x->{cache} // '(none)' }++;
        diag("client $i ($combos[$i % 6]{cred} $combos[$i % 6]{scope}) got "
             . substr($x->{body}, 0, 120))
            if $x->{body} ne $combos[$i % 6]{body};
    }
    return ($ok, $own, \%cache);
}

my ($ok, $own, $cache) = crowd_round();
is($ok, 60, 'crowd round 1: 60 answers 200');
is($own, 60, 'crowd round 1: every client got exactly its own list');
is(($cache->{MISS} // 0) + ($cache->{HIT} // 0), 60,
   'crowd round 1: each a MISS or a HIT');
my $fetches = $t->mock_total;
cmp_ok($fetches, '>=', 6, 'crowd round 1: at least one fetch per pair');
cmp_ok($fetches, '<=', 60, 'crowd round 1: at most one fetch per client');
cmp_ok($t->mock_stats->{max_in_flight}, '>', 1, 'crowd round 1: fetches overlapped');
my %pairs = map { ("$_->{auth} $_->{path}" => 1) } @{ $t->mock_stats->{requests} };
is(scalar keys %pairs, 6, 'crowd round 1: all 6 pairs were fetched');
my $cs = MCTest::json_decode($t->get('/stats-crowd')->{content});
is($cs->{entries}, 6, 'crowd: six entries');
is($cs->{upstream_fetches}, $fetches, 'crowd: upstream_fetches is what the mock saw');

($ok, $own, $cache) = crowd_round();
is($ok, 60, 'crowd round 2: 60 answers 200');
is($own, 60, 'crowd round 2: every client got exactly its own list');
is($cache->{HIT} // 0, 60, 'crowd round 2: all HIT');
is($t->mock_total, $fetches, 'crowd round 2: no new fetch');

# ---- modelcache_credentials off ---------------------------------------------------

$t->mock_reset;
$t->mock_route({ path => '/shared/v1/models', body => list_for('anyone') });

$r = $t->get('/shared/v1/models', %a);
is(cache($r), 'MISS', 'credentials off: key-a MISS');
$r = $t->get('/shared/v1/models', %b);
is(cache($r), 'HIT', 'credentials off: key-b shares the entry (HIT)');
is($r->{content}, list_for('anyone'), 'credentials off: same list');
$r = $t->get('/shared/v1/models', 'X-Api-Key' => 'other');
is(cache($r), 'HIT', 'credentials off: another header shares it too');
is($t->mock_count('/shared/v1/models'), 1, 'credentials off: one fetch');

# ---- modelcache_credentials $http_x_tenant_key -------------------------------------

$t->mock_route({ path => '/tenant/v1/models', body => list_for('tenant') });

$r = $t->get('/tenant/v1/models', %a, 'X-Tenant-Key' => 't1');
is(cache($r), 'MISS', 'custom credentials: key-a t1 MISS');
$r = $t->get('/tenant/v1/models', %b, 'X-Tenant-Key' => 't1');
is(cache($r), 'HIT', 'custom credentials: Authorization no longer splits');
$r = $t->get('/tenant/v1/models', %a, 'X-Tenant-Key' => 't2');
is(cache($r), 'MISS', 'custom credentials: X-Tenant-Key does');
$r = $t->get('/tenant/v1/models', %b, 'X-Tenant-Key' => 't2');
is(cache($r), 'HIT', 'custom credentials: t2 shared across Authorization');
is($t->mock_count('/tenant/v1/models'), 2, 'custom credentials: two fetches');

# ---- secrets are never in clear ----------------------------------------------------

my $hex = join '', map { sprintf '%08x', int rand 2**32 } 1 .. 2;
my $secret = "sk-SECRET-$hex";
my $scope = "team-ZZZ-$hex";

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => "Bearer $secret",
                 body => list_for('the-secret-holder') });
$t->mock_route({ path => '/v1/models', auth => $secret,
                 body => list_for('the-secret-holder') });
$t->mock_route({ path => '/tenant/v1/models', body => list_for('tenant') });

# the secret's hex part may only appear inside the scope, which is kept
# and logged in clear on purpose
sub no_secret {
    my ($text, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    (my $rest = $text // '') =~ s/\Q$scope\E//g;
    unlike($rest, qr/\Q$hex\E|sk-SECRET/, $name);
}

for my $h (['Authorization', "Bearer $secret"], ['X-Api-Key', $secret]) {
    $r = $t->get('/v1/models', $h->[0] => $h->[1], 'X-Profile' => $scope);
    is(cache($r), 'MISS', "secret in $h->[0]: MISS");
    is($r->{content}, list_for('the-secret-holder'), "secret in $h->[0]: its list");
    $r = $t->get('/v1/models', $h->[0] => $h->[1], 'X-Profile' => $scope);
    is(cache($r), 'HIT', "secret in $h->[0]: HIT");
}
$r = $t->get('/tenant/v1/models', 'X-Tenant-Key' => $secret, 'X-Profile' => $scope);
is(cache($r), 'MISS', 'secret as a custom credential: MISS');
is(by_auth("Bearer $secret"), 1, 'the provider did get the secret (Authorization)');
is(by_auth($secret), 1, 'the provider did get the secret (X-Api-Key)');
is($t->mock_stats->{requests}[-1]{headers}{'x-tenant-key'}, $secret,
   'the provider did get the secret (X-Tenant-Key)');

my $stats = $t->get('/stats');
is($stats->{status}, 200, 'stats JSON: 200');
no_secret($stats->{content}, 'stats JSON: no secret');
my $prom = $t->get('/stats?format=prometheus');
is($prom->{status}, 200, 'stats Prometheus: 200');
like($prom->{content}, qr/^modelcache_entries\{zone="models"\} \d+$/m,
     'stats Prometheus: a real exposition');
no_secret($prom->{content}, 'stats Prometheus: no secret');

# the shared memory of a worker: every shared mapping (the zones among them)
{
    no warnings 'portable';
    my @workers = $t->worker_pids;
    is(scalar @workers, 2, 'two workers to inspect');
    for my $pid (@workers) {
        my ($maps, $bytes, $has_secret, $has_scope) = (0, 0, 0, 0);
        open(my $mf, '<', "/proc/$pid/maps") or die "maps of $pid: $!";
        open(my $mem, '<:raw', "/proc/$pid/mem") or die "mem of $pid: $!";
        while (my $line = <$mf>) {
            my ($from, $to, $perms) = $line =~ /^([0-9a-f]+)-([0-9a-f]+) (\S+)/
                or next;
            next unless $perms eq 'rw-s';
            my ($start, $len) = (hex $from, hex($to) - hex($from));
            sysseek($mem, $start, 0) or die "seek $pid $from: $!";
            my $data = '';
            while (length $data < $len) {
                my $n = sysread($mem, $data, $len - length $data, length $data);
                die "read $pid $from: $!" unless $n;
            }
            $maps++;
            $bytes += $len;
            $has_secret++ if index($data, $secret) >= 0 || index($data, 'sk-SECRET-') >= 0;
            $has_scope++ if index($data, $scope) >= 0;
        }
        cmp_ok($bytes, '>=', 16 * 1024 * 1024,
               "worker $pid: read $maps shared mappings, both 8m zones included");
        ok($has_scope, "worker $pid: the scope is in shared memory (the scan sees the zone)");
        ok(!$has_secret, "worker $pid: the secret is not in shared memory");
    }
}

# purge answers
for my $q ("?scope=$scope", '?pass=%2F_provider%2Fv1%2Fmodels', '') {
    $r = $t->http('PURGE', "/purge$q");
    is($r->{status}, 200, "purge$q: 200");
    like($r->{content}, qr/^\{"purged":\d+\}\n\z/, "purge$q: answer");
    no_secret($r->{content}, "purge$q: no secret");
}
$r = $t->http('PURGE', '/purge?bogus=1',
              headers => { Authorization => "Bearer $secret" });
is($r->{status}, 400, 'purge with a bad arg: 400');
no_secret($r->{content}, 'purge 400 answer: no secret');

# the logs, once nginx has flushed and closed them
$t->stop;
my $mc = $t->read_file('mc.log') // '';
like($mc, qr/^\/v1\/models 200 MISS [0-9a-f]{64}$/m, 'access log has $modelcache_key');
no_secret($mc, 'access log with $modelcache_key: no secret');
no_secret($t->read_file('access.log'), 'default access log: no secret');
like($t->error_log, qr/modelcache purge in zone "models": scope "\Q$scope\E"/,
     'the purge notice names the scope');
no_secret($t->error_log, 'error log: no secret');

$t->done_testing;
