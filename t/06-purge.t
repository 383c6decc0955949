#!/usr/bin/perl

# Purge: PURGE/POST/DELETE drop all entries of a zone, or those of a scope
# and/or a pass URI (percent-decoded, args included, both = AND); other
# methods 405; bad args 400; every purge logged at notice and counted in the
# stats; nginx's own access control applies; and a purge never frees an
# entry that is still being sent (slow readers of a 12 MiB body keep their
# bytes while the entry is purged and replaced again and again).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use IO::Socket::INET;
use Socket qw(SOL_SOCKET SO_RCVBUF inet_aton sockaddr_in);
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:8m;
    modelcache_zone zone=big:64m max_entry=16m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache       models;
            modelcache_pass  /_p/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /api/tags {
            modelcache       models;
            modelcache_pass  /_p/api/tags;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /beta/v1/models {
            modelcache       models;
            modelcache_pass  /_p/v1/models?beta=1;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /denied/purge {
            deny all;
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }

        location = /big {
            modelcache      big;
            modelcache_pass /_p/big;
            modelcache_ttl  300s;
        }

        location = /big/purge {
            modelcache_purge big;
        }

        location = /big/stats {
            modelcache_stats big;
        }
    }
EOF
$t->run;

my %body = (
    '/v1/models'      => $t->fixture('openai_models.json'),
    '/beta/v1/models' => $t->fixture('openai_models.json'),
    '/api/tags'       => $t->fixture('ollama_tags.json'),
);
my @LOCS = ('/v1/models', '/api/tags', '/beta/v1/models');
my @SCOPES = ('', 'team-a', 'team-b', 'team a/b');

# a key is "location|scope"; 3 pass URIs x 4 scopes = 12 entries
my @ALL = map { my $l = $_; map { "$l|$_" } @SCOPES } @LOCS;

sub keys_where {
    my (%f) = @_;
    return grep {
        my ($l, $s) = split /\|/, $_, 2;
        (!exists $f{loc} || $l eq $f{loc}) && (!exists $f{scope} || $s eq $f{scope})
    } @ALL;
}

sub request {
    my ($key) = @_;
    my ($loc, $scope) = split /\|/, $key, 2;
    return $t->get($loc, length $scope ? ('X-Profile' => $scope) : ());
}

# which keys the provider was asked for since the last mock_reset
sub fetched {
    my %f;
    for my $q (@{ $t->mock_stats->{requests} }) {
        my $loc = $q->{path} eq '/api/tags' ? '/api/tags'
                : ($q->{query} // '') eq 'beta=1' ? '/beta/v1/models'
                : $q->{path} eq '/v1/models' && ($q->{query} // '') eq '' ? '/v1/models'
                : "?$q->{path}?" . ($q->{query} // '');
        $f{$loc . '|' . ($q->{headers}{'x-profile'} // '')}++;
    }
    return \%f;
}

sub stats {
    my ($loc) = @_;
    my $r = $t->get($loc // '/stats');
    my $s = MCTest::json_decode($r->{content});
    die "stats: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

# Requests all 12 keys: the @gone ones must be a MISS (and fetched again,
# which restores them), all others a HIT with no fetch.
sub check_entries {
    my ($name, @gone) = @_;
    my %gone = map { $_ => 1 } @gone;
    $t->mock_reset;
    my (%got, %want, $bad_body);
    for my $key (@ALL) {
        my $r = request($key);
        my ($loc) = split /\|/, $key;
        $got{$key} = "$r->{status} " . ($r->{headers}{'x-modelcache-status'} // '-');
        $want{$key} = '200 ' . ($gone{$key} ? 'MISS' : 'HIT');
        $bad_body++ unless $r->{content} eq $body{$loc};
    }
    is_deeply(\%got, \%want, "$name: purged entries MISS, the others HIT")
        or diag(explain(\%got));
    ok(!$bad_body, "$name: every answer is the provider's list");
    is_deeply(fetched(), { map { $_ => 1 } @gone },
              "$name: exactly the purged entries were fetched again");
}

my @log_want;    # the notice lines, in order
my $purged_sum = 0;

sub purge_ok {
    my ($name, $method, $args, $n, $log_scope, $log_pass) = @_;
    my $r = $t->http($method, '/purge' . (defined $args ? "?$args" : ''));
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    is($r->{content}, "{\"purged\":$n}\n", "$name: {\"purged\":$n}");
    $purged_sum += $n;
    push @log_want, "modelcache purge in zone \"models\": scope $log_scope pass $log_pass, "
                    . "$n entries purged";
    return $r;
}

my $ANY = '(any) ""';

# ---- fill: 12 entries ------------------------------------------------------

check_entries('fill', @ALL);
check_entries('filled', ());
is(stats()->{entries}, 12, 'fill: 12 entries in the zone');

# ---- all -------------------------------------------------------------------

purge_ok('PURGE, no args', 'PURGE', undef, 12, $ANY, $ANY);
is(stats()->{entries}, 0, 'PURGE, no args: zone empty');
check_entries('PURGE, no args', @ALL);

my $r = $t->http('POST', '/purge', body => 'scope=team-a',
                 headers => { 'Content-Type' => 'application/x-www-form-urlencoded' });
is($r->{status}, 200, 'POST, no args: 200');
is($r->{content}, "{\"purged\":12}\n", 'POST, no args: all 12 purged (body ignored)');
$purged_sum += 12;
push @log_want, "modelcache purge in zone \"models\": scope $ANY pass $ANY, 12 entries purged";
check_entries('POST, no args', @ALL);

purge_ok('DELETE, no args', 'DELETE', undef, 12, $ANY, $ANY);
check_entries('DELETE, no args', @ALL);

# ---- other methods ---------------------------------------------------------

for my $m (qw(GET HEAD PUT PATCH OPTIONS)) {
    $r = $t->http($m, '/purge', ($m eq 'PUT' || $m eq 'PATCH') ? (body => '{}') : ());
    is($r->{status}, 405, "$m on purge: 405");
    is($r->{headers}{allow}, 'PURGE, POST, DELETE', "$m on purge: Allow");
    if ($m eq 'HEAD') {
        is($r->{content}, '', 'HEAD on purge: no body');
    } else {
        my $e = MCTest::json_decode($r->{content});
        is($e && $e->{error}{type}, 'modelcache_method_not_allowed',
           "$m on purge: JSON error");
    }
}
$r = $t->http('GET', '/purge?scope=team-a');
is($r->{status}, 405, 'GET with args on purge: 405');
check_entries('after 405s', ());

# ---- by scope --------------------------------------------------------------

purge_ok('scope=team-a', 'PURGE', 'scope=team-a', 3, '"team-a"', $ANY);
check_entries('scope=team-a', keys_where(scope => 'team-a'));

purge_ok('scope=team%20a%2Fb', 'PURGE', 'scope=team%20a%2Fb', 3, '"team a/b"', $ANY);
check_entries('scope=team%20a%2Fb', keys_where(scope => 'team a/b'));

purge_ok('scope= (empty scope)', 'PURGE', 'scope=', 3, '""', $ANY);
check_entries('scope= (empty scope)', keys_where(scope => ''));

purge_ok('scope=team%2Db (any byte may be encoded)', 'DELETE', 'scope=team%2Db', 3,
         '"team-b"', $ANY);
check_entries('scope=team%2Db', keys_where(scope => 'team-b'));

# ---- by pass ---------------------------------------------------------------

purge_ok('pass=%2F_p%2Fapi%2Ftags', 'PURGE', 'pass=%2F_p%2Fapi%2Ftags', 4, $ANY,
         '"/_p/api/tags"');
check_entries('pass=%2F_p%2Fapi%2Ftags', keys_where(loc => '/api/tags'));

purge_ok('pass=/_p/v1/models (not the one with args)', 'POST', 'pass=/_p/v1/models', 4,
         $ANY, '"/_p/v1/models"');
check_entries('pass=/_p/v1/models', keys_where(loc => '/v1/models'));

purge_ok('pass=/_p/v1/models%3Fbeta%3D1', 'PURGE', 'pass=/_p/v1/models%3Fbeta%3D1', 4,
         $ANY, '"/_p/v1/models?beta=1"');
check_entries('pass=/_p/v1/models%3Fbeta%3D1', keys_where(loc => '/beta/v1/models'));

# ---- scope and pass: AND -----------------------------------------------------

purge_ok('scope=team-b&pass=(beta)', 'PURGE',
         'scope=team-b&pass=%2F_p%2Fv1%2Fmodels%3Fbeta%3D1', 1,
         '"team-b"', '"/_p/v1/models?beta=1"');
check_entries('scope=team-b&pass=(beta)', '/beta/v1/models|team-b');

purge_ok('pass=/_p/api/tags&scope= (order, empty scope)', 'DELETE',
         'pass=/_p/api/tags&scope=', 1, '""', '"/_p/api/tags"');
check_entries('pass=/_p/api/tags&scope=', '/api/tags|');

purge_ok('scope=team%20a%2Fb&pass=/_p/v1/models', 'POST',
         'scope=team%20a%2Fb&pass=/_p/v1/models', 1, '"team a/b"', '"/_p/v1/models"');
check_entries('scope=team%20a%2Fb&pass=/_p/v1/models', '/v1/models|team a/b');

# ---- nothing matches ---------------------------------------------------------

purge_ok('scope=nobody', 'PURGE', 'scope=nobody', 0, '"nobody"', $ANY);
purge_ok('scope=TEAM-A (exact match only)', 'PURGE', 'scope=TEAM-A', 0, '"TEAM-A"', $ANY);
purge_ok('scope=team (no prefix match)', 'PURGE', 'scope=team', 0, '"team"', $ANY);
purge_ok('pass=/_p/v1 (no prefix match)', 'PURGE', 'pass=/_p/v1', 0, $ANY, '"/_p/v1"');
purge_ok('pass=/_p/v1/models%3Fbeta%3D2', 'PURGE', 'pass=/_p/v1/models%3Fbeta%3D2', 0,
         $ANY, '"/_p/v1/models?beta=2"');
purge_ok('pass=/v1/models (the client URI is not the pass)', 'PURGE',
         'pass=/v1/models', 0, $ANY, '"/v1/models"');
purge_ok('scope=team-a&pass=/_p/none', 'PURGE', 'scope=team-a&pass=/_p/none', 0,
         '"team-a"', '"/_p/none"');
check_entries('after purges of nothing', ());

purge_ok('all, before the empty-zone purge', 'PURGE', undef, 12, $ANY, $ANY);
purge_ok('PURGE of an empty zone', 'PURGE', undef, 0, $ANY, $ANY);
check_entries('refill', @ALL);

# ---- bad args ----------------------------------------------------------------

my $before = stats();
for my $args ('foo=1', 'scope=a&foo=1', 'scope=a&scope=b', 'pass=/x&pass=/y',
              'scope', 'scope=a&pass', 'scope=%zz', 'scope=%4', 'pass=%4',
              'scope=%', 'pass=%2F_p%2')
{
    $r = $t->http('PURGE', "/purge?$args");
    is($r->{status}, 400, "bad args '$args': 400");
    is($r->{headers}{'content-type'}, 'application/json', "bad args '$args': JSON");
    my $e = MCTest::json_decode($r->{content});
    is($e && $e->{error}{type}, 'modelcache_bad_request',
       "bad args '$args': type modelcache_bad_request");
    ok($e && length($e->{error}{message} // ''), "bad args '$args': a message");
}
my $after = stats();
is($after->{entries}, 12, 'bad args: nothing purged (12 entries)');
is($after->{purged}, $before->{purged}, 'bad args: purged counter unchanged');

# ---- access control is nginx's ---------------------------------------------------

$r = $t->http('PURGE', '/denied/purge');
is($r->{status}, 403, 'deny all: 403');
$r = $t->http('POST', '/denied/purge?scope=team-a');
is($r->{status}, 403, 'deny all, POST with args: 403');
is(stats()->{entries}, 12, 'deny all: nothing purged');
check_entries('after 403', ());

# ---- log and stats ---------------------------------------------------------------

my @log_got = $t->error_log =~ /\[notice\] [^\n]*?(modelcache purge in zone "models":[^\n]*? entries purged)/g;
is_deeply(\@log_got, \@log_want, 'one notice line per purge, with what it matched')
    or diag(explain(\@log_got));
is(stats()->{purged}, $purged_sum, "stats purged is the sum of the answers ($purged_sum)");

# ---- purge under readers of a 12 MiB entry -----------------------------------------

my $big = $t->fixture('adv_large_12mb.json');
my $big_fresh = stats('/big/stats');
is($big_fresh->{entries}, 0, 'big zone: empty at first');

$t->mock_reset;
$r = $t->get('/big');
is($r->{status}, 200, 'big: 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'big: MISS');
ok($r->{content} eq $big, 'big: the 12 MiB body');
$r = $t->get('/big');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'big: stored (HIT)');
ok($r->{content} eq $big, 'big: HIT has the 12 MiB body');

# Every later fetch answers a different body (stamped), so that a freed and
# reused entry would show up as changed bytes in a reader's body.
$t->mock_route({ path => '/big', fixture => 'adv_large_12mb.json', mode => 'stamp' });

my $readers = 8;
my $purges = 20;
my $dir = $t->dir;

# A slow reader: small receive buffer, reads 64 KiB every 10 ms, so the
# entry stays pinned for a few seconds while the purges go on.
sub slow_reader {
    my ($i) = @_;
    my $s = IO::Socket::INET->new(Proto => 'tcp') or die "socket: $!\n";
    setsockopt($s, SOL_SOCKET, SO_RCVBUF, pack('i', 65536)) or die "SO_RCVBUF: $!\n";
    connect($s, sockaddr_in($t->port, inet_aton('127.0.0.1'))) or die "connect: $!\n";
    syswrite($s, "GET /big HTTP/1.0\r\nHost: localhost\r\n\r\n");
    my $buf = '';
    my $deadline = time + 40;
    while (index($buf, "\r\n\r\n") < 0 && time < $deadline) {
        sysread($s, $buf, 65536, length $buf) or last;
    }
    my ($head, $body) = split /\r\n\r\n/, $buf, 2;
    $body //= '';
    if (open(my $fh, '>', "$dir/reader-$i")) {    # headers are in
        close $fh;
    }
    while (time < $deadline) {
        sleep 0.01;
        sysread($s, $body, 65536, length $body) or last;
    }
    my ($status) = ($head // '') =~ m{^HTTP/1\.\d (\d+)};
    my ($cache) = ($head // '') =~ /^X-Modelcache-Status: (\S+)/mi;
    return { status => $status // 0, cache => $cache // '-', len => length $body,
             same => ($body eq $big ? 1 : 0) };
}

sub purger {
    my $ready = $t->wait_for(sub { $readers == grep { -e "$dir/reader-$_" } 0 .. $readers - 1 }, 20);
    return { error => 'readers did not get their headers' } unless $ready;
    my (@n, @get);
    for (1 .. $purges) {
        my $p = $t->http('PURGE', '/big/purge');
        push @n, $p->{status} == 200 && $p->{content} =~ /^\{"purged":(\d+)\}\n\z/ ? $1 : "$p->{status}";
        my $g = $t->get('/big');
        push @get, { status => $g->{status}, cache => $g->{headers}{'x-modelcache-status'} // '-',
                     stamped => ($g->{content} =~ /\A\{"mock_seq":\d+,/ ? 1 : 0),
                     len => length $g->{content} };
        sleep 0.05;
    }
    return { purged => \@n, gets => \@get };
}

my $res = $t->parallel($readers + 1, sub {
    my ($i) = @_;
    return $i == $readers ? purger() : slow_reader($i);
}, timeout => 90);

my @rd = @$res[0 .. $readers - 1];
my $pg = $res->[$readers];
is(scalar(grep { $_ && $_->{status} == 200 } @rd), $readers, 'readers: all 200');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @rd), $readers, 'readers: all HIT');
is(scalar(grep { $_ && $_->{len} == length $big } @rd), $readers, 'readers: all 12 MiB')
    or diag(explain([ map { $_ && $_->{len} } @rd ]));
is(scalar(grep { $_ && $_->{same} } @rd), $readers,
   'readers: byte-identical bodies while the entry was purged under them');
ok(!$pg->{error}, 'purger ran') or diag($pg->{error});
is_deeply($pg->{purged}, [ (1) x $purges ], "purger: $purges purges of one entry each")
    or diag(explain($pg->{purged}));
is(scalar(grep { $_->{status} == 200 && $_->{cache} eq 'MISS' && $_->{stamped} }
          @{ $pg->{gets} // [] }), $purges, 'purger: each refetch a MISS with the new body');
is($t->mock_count('/big'), 1 + $purges, 'big: one fetch at first and one per refetch');

my $bs = stats('/big/stats');
is($bs->{purged}, $purges, 'big stats: purged counts every purge');
is($bs->{entries}, 1, 'big stats: the last refetch is stored');
$r = $t->http('PURGE', '/big/purge');
is($r->{content}, "{\"purged\":1}\n", 'big: final purge');
$bs = stats('/big/stats');
is($bs->{entries}, 0, 'big: zone empty');
is($bs->{used}, $big_fresh->{used}, 'big: all memory back once the readers are gone');
$t->log_unlike(qr/\[alert\]/, 'no alert in the log');

# purge filters cannot forge log lines

$r = $t->http('PURGE', '/big/purge?scope=a%0A2026/11/23%2000:00:00%20'
                       . '%5Binfo%5D%201%231:%20forged&pass=%22x%5C');
is($r->{content}, "{\"purged\":0}\n", 'a purge with control characters');
$t->log_like(qr/scope "a\\n2026\/11\/23 00:00:00 \[info\] 1#1: forged" pass "\\"x\\\\", 0 entries purged/,
             'its filters are logged escaped, on one line');
$t->log_unlike(qr/^2026\/11\/23 00:00:00 \[info\]/m, 'no forged line');

$t->done_testing;
