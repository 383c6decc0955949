#!/usr/bin/perl

# Memory pressure: a zone far too small for its keys evicts the least
# recently used entries and never fails a client request for lack of memory
# (10,000 distinct scopes through a 256k zone, every answer 200 with the
# provider's bytes, every entry either still stored or counted as evicted);
# eviction is LRU (a read keeps an entry, an unread one goes); 15 KB lists
# then push the small ones out of the same zone; an entry being sent is
# never freed under its readers, however many stores need its room; and when
# every entry is being sent, a list that finds no room is answered all the
# same (and logged at [alert], as nginx's own caches do).

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

# %%PORT2%% has a small send buffer, so that nginx cannot hand a whole 1 MB
# body to the kernel: its slow readers keep the entry pinned.
$t->write_conf(<<'EOF');
    modelcache_zone zone=small:256k max_entry=64k;
    modelcache_zone zone=big:4m max_entry=2m;
    modelcache_zone zone=full:4m max_entry=2m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        listen 127.0.0.1:%%PORT2%% sndbuf=16k;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /tiny/v1/models {
            modelcache       small;
            modelcache_pass  /_p/tiny/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /v1/models {
            modelcache       small;
            modelcache_pass  /_p/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /small/stats {
            modelcache_stats small;
        }

        location = /openrouter/api/v1/models {
            modelcache       big;
            modelcache_pass  /_p/openrouter/api/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /big/stats {
            modelcache_stats big;
        }

        location = /full/v1/models {
            modelcache       full;
            modelcache_pass  /_p/openrouter/api/v1/models;
            modelcache_scope $http_x_profile;
            modelcache_ttl   300s;
        }

        location = /full/stats {
            modelcache_stats full;
        }
    }
EOF
$t->run;

my $TINY = '{"object":"list","data":[{"id":"m"}]}';
$t->mock_route({ path => '/tiny/v1/models', body => $TINY });

my @COUNTERS = qw(hits misses expired stale updating bypass errors upstream_fetches
                  evictions purged);

sub stats {
    my ($zone) = @_;
    my $r = $t->get("/$zone/stats");
    my $s = MCTest::json_decode($r->{content});
    die "stats: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

# the counters that moved since $before (entries as they are now)
sub delta {
    my ($before, $after) = @_;
    my %d = map { $_ => $after->{$_} - $before->{$_} } @COUNTERS;
    return \%d;
}

# GET of a scope: "status cache-status", and whether the body is $want
sub ask {
    my ($path, $scope, $want) = @_;
    my $r = $t->get($path, 'X-Profile' => $scope);
    return ("$r->{status} " . ($r->{headers}{'x-modelcache-status'} // '-'),
            $r->{content} eq $want ? 1 : 0);
}

# ---- 10,000 distinct scopes through a 256k zone ------------------------------

my $N = 10_000;
my $KIDS = 8;

my $s0 = stats('small');
is($s0->{entries}, 0, 'small zone: empty at first');
is($s0->{size}, 256 * 1024, 'small zone: 256k');

my $t0 = time;
my $res = $t->parallel($KIDS, sub {
    my ($i) = @_;
    my ($from, $to) = (int($i * $N / $KIDS), int(($i + 1) * $N / $KIDS) - 1);
    my (%n, @bad);
    my $deadline = time + 80;
    for my $k ($from .. $to) {
        last if time > $deadline;
        my $r = $t->get('/tiny/v1/models', 'X-Profile' => "p$k");
        my $cache = $r->{headers}{'x-modelcache-status'} // '-';
        $n{sent}++;
        if ($r->{status} == 200 && $r->{content} eq $TINY) {
            $n{ok}++;
        } elsif (@bad < 10) {
            push @bad, "p$k: $r->{status} $cache " . substr($r->{content}, 0, 200);
        }
        $n{$cache}++;
    }
    return { n => \%n, bad => \@bad };
}, timeout => 100);
my $took = time - $t0;

my %sum;
for my $c (grep { $_ } @$res) {
    $sum{$_} += $c->{n}{$_} for keys %{ $c->{n} };
}
my @bad = map { @{ $_->{bad} } } grep { $_ } @$res;
is(scalar(grep { $_ } @$res), $KIDS, "$KIDS clients finished");
is($sum{sent} // 0, $N, "$N requests sent");
is($sum{ok} // 0, $N, "all $N answered 200 with the provider's list")
    or diag(join "\n", @bad);
is($sum{MISS} // 0, $N, "all $N a MISS (distinct scopes)");
note(sprintf '%d requests in %.1f s', $sum{sent} // 0, $took);

my $s1 = stats('small');
my $d = delta($s0, $s1);
cmp_ok($s1->{entries}, '>', 0, "entries afterwards: $s1->{entries}, more than 0");
cmp_ok($s1->{entries}, '<', 1000, 'and far fewer than the keys (the zone is full)');
is($s1->{entries} + $d->{evictions}, $N,
   "every entry stored is still there or was evicted ($s1->{entries} + $d->{evictions})");
is_deeply($d, { (map { $_ => 0 } @COUNTERS), misses => $N, upstream_fetches => $N,
                evictions => $N - $s1->{entries} },
          "counters: $N misses, $N fetches, no error")
    or diag(explain($d));
is($t->mock_count('/tiny/v1/models'), $N, "the provider was asked $N times");
cmp_ok($s1->{used}, '<=', $s1->{size}, 'used within the zone');

# the first scopes of every client: each client stored 1,000 more since
my (%got, $bodies) = ();
for my $i (0 .. $KIDS - 1) {
    my $k = int($i * $N / $KIDS);
    my ($st, $same) = ask('/tiny/v1/models', "p$k", $TINY);
    $got{"p$k"} = $st;
    $bodies += $same;
}
is_deeply(\%got, { map { ('p' . int($_ * $N / $KIDS)) => '200 MISS' } 0 .. $KIDS - 1 },
          'the oldest scopes were evicted: MISS again') or diag(explain(\%got));
is($bodies, $KIDS, 'with the list');

# ---- LRU: a read keeps an entry, an unread one goes -------------------------------

my $E = $s1->{entries};
my $fills = 3 * $E + 50;    # three times what the zone holds
my $s2 = stats('small');

my ($st, $same) = ask('/tiny/v1/models', 'keep', $TINY);
is($st, '200 MISS', 'lru: "keep" stored');
($st, $same) = ask('/tiny/v1/models', 'drop', $TINY);
is($st, '200 MISS', 'lru: "drop" stored');

my (%fill, %keep, $fill_bodies);
for my $j (1 .. $fills) {
    ($st, $same) = ask('/tiny/v1/models', "fill-$j", $TINY);
    $fill{$st}++;
    $fill_bodies += $same;
    if ($j % 10 == 0) {
        ($st) = ask('/tiny/v1/models', 'keep', $TINY);
        $keep{$st}++;
    }
}
is_deeply(\%fill, { '200 MISS' => $fills }, "lru: $fills new scopes, each a MISS");
is($fill_bodies, $fills, 'lru: each with the list');
is_deeply(\%keep, { '200 HIT' => int($fills / 10) },
          '"keep", read every 10 stores, is never evicted') or diag(explain(\%keep));

# the most recent are hits (checked first: a hit stores nothing)
my @recent = map { "fill-$_" } $fills - 19 .. $fills;
%got = map { $_ => (ask('/tiny/v1/models', $_, $TINY))[0] } @recent;
is_deeply(\%got, { map { $_ => '200 HIT' } @recent }, 'the 20 most recent scopes: HIT')
    or diag(explain(\%got));
($st) = ask('/tiny/v1/models', 'keep', $TINY);
is($st, '200 HIT', '"keep": HIT');
($st, $same) = ask('/tiny/v1/models', 'drop', $TINY);
is($st, '200 MISS', '"drop", never read again: evicted, MISS');
my @oldest = map { "fill-$_" } 1 .. 20;
%got = map { $_ => (ask('/tiny/v1/models', $_, $TINY))[0] } @oldest;
is_deeply(\%got, { map { $_ => '200 MISS' } @oldest }, 'the 20 oldest fills: MISS')
    or diag(explain(\%got));

my $s3 = stats('small');
$d = delta($s2, $s3);
my $lru_stores = 2 + $fills + 1 + 20;
is($d->{misses}, $lru_stores, "lru: $lru_stores misses");
is($d->{hits}, int($fills / 10) + 20 + 1, 'lru: the hits');
is($d->{upstream_fetches}, $lru_stores, 'lru: one fetch per miss');
is($s3->{entries} + $d->{evictions}, $s2->{entries} + $lru_stores,
   'lru: every entry stored is still there or was evicted');
is($d->{errors}, 0, 'lru: no error');

# ---- 15 KB lists through the same zone ---------------------------------------------

my $openai = $t->fixture('openai_models.json');
my $M = 500;
my $MKIDS = 5;
my $s4 = stats('small');

$res = $t->parallel($MKIDS, sub {
    my ($i) = @_;
    my (%n, @bad);
    my $deadline = time + 50;
    for my $k ($i * $M / $MKIDS .. ($i + 1) * $M / $MKIDS - 1) {
        last if time > $deadline;
        my $r = $t->get('/v1/models', 'X-Profile' => "mid-$k");
        my $cache = $r->{headers}{'x-modelcache-status'} // '-';
        $n{sent}++;
        if ($r->{status} == 200 && $r->{content} eq $openai) {
            $n{ok}++;
        } elsif (@bad < 10) {
            push @bad, "mid-$k: $r->{status} $cache len " . length($r->{content});
        }
        $n{$cache}++;
    }
    return { n => \%n, bad => \@bad };
}, timeout => 60);

%sum = ();
for my $c (grep { $_ } @$res) {
    $sum{$_} += $c->{n}{$_} for keys %{ $c->{n} };
}
@bad = map { @{ $_->{bad} } } grep { $_ } @$res;
is($sum{sent} // 0, $M, "15 KB lists: $M requests sent");
is($sum{ok} // 0, $M, "15 KB lists: all $M answered 200 with the exact fixture bytes")
    or diag(join "\n", @bad);
is($sum{MISS} // 0, $M, '15 KB lists: all MISS');

my $s5 = stats('small');
$d = delta($s4, $s5);
cmp_ok($d->{evictions}, '>', 0, "15 KB lists: evictions ($d->{evictions})");
cmp_ok($s5->{entries}, '>', 0, "15 KB lists: entries afterwards ($s5->{entries})");
cmp_ok($s5->{entries}, '<', 256 / 15, 'no more than fit');
is($s5->{entries} + $d->{evictions}, $s4->{entries} + $M,
   '15 KB lists: every entry stored is still there or was evicted');
is_deeply($d, { (map { $_ => 0 } @COUNTERS), misses => $M, upstream_fetches => $M,
                evictions => $d->{evictions} },
          "15 KB lists: $M misses and fetches, no error") or diag(explain($d));
is($t->mock_count('/v1/models'), $M, "15 KB lists: the provider was asked $M times");

# the newest 15 KB list is there, byte for byte
($st) = ask('/v1/models', 'mid-new', $openai);
is($st, '200 MISS', 'one more 15 KB list: MISS');
($st, $same) = ask('/v1/models', 'mid-new', $openai);
is($st, '200 HIT', 'stored, though the zone is full: HIT');
ok($same, 'with the fixture bytes');

# ---- an entry being sent is never freed under its readers ---------------------------

my $router = $t->fixture('openrouter_models.json');
my $readers = 6;
my $big_stores = 40;
my $dir = $t->dir;
my $b0 = stats('big');

# Every evicting store answers a different body (stamped), so that a freed
# and reused entry would show up as changed bytes in a reader's body.
$t->mock_route({ path => '/openrouter/api/v1/models', auth => 'Bearer evict',
                 fixture => 'openrouter_models.json', mode => 'stamp' });

my $r = $t->get('/openrouter/api/v1/models', 'X-Profile' => 'reader');
is("$r->{status} $r->{headers}{'x-modelcache-status'}", '200 MISS', 'big: the readers\' entry stored');
ok($r->{content} eq $router, 'big: 1 MB list');

sub touch {
    my ($path) = @_;
    open(my $fh, '>', $path) or die "$path: $!\n";
    close $fh;
}

# A slow reader of $path for X-Profile $scope: small receive buffer (and the
# server's small send buffer), 16 KiB every 20 ms; half way through it
# touches $mark and stops until $gate exists, so the entry stays pinned
# during all that happens meanwhile.
sub slow_reader {
    my ($path, $scope, $mark, $gate) = @_;
    my $s = IO::Socket::INET->new(Proto => 'tcp') or die "socket: $!\n";
    setsockopt($s, SOL_SOCKET, SO_RCVBUF, pack('i', 16384)) or die "SO_RCVBUF: $!\n";
    connect($s, sockaddr_in($t->port2, inet_aton('127.0.0.1'))) or die "connect: $!\n";
    syswrite($s, "GET $path HTTP/1.0\r\nHost: localhost\r\nX-Profile: $scope\r\n\r\n");
    my $buf = '';
    my $deadline = time + 50;
    while (index($buf, "\r\n\r\n") < 0 && time < $deadline) {
        sysread($s, $buf, 16384, length $buf) or last;
    }
    my ($head, $body) = split /\r\n\r\n/, $buf, 2;
    $body //= '';
    my $paused = 0;
    while (time < $deadline) {
        if (length $body >= length($router) / 2 && !-e $gate) {
            if (!$paused) {
                $paused = 1;
                touch($mark);
            }
            sleep 0.02;
            next;
        }
        sleep 0.02 unless -e $gate;
        sysread($s, $body, 16384, length $body) or last;
    }
    my ($status) = ($head // '') =~ m{^HTTP/1\.\d (\d+)};
    my ($cache) = ($head // '') =~ /^X-Modelcache-Status: (\S+)/mi;
    return { status => $status // 0, cache => $cache // '-', len => length $body,
             same => ($body eq $router ? 1 : 0), paused => $paused };
}

sub evictor {
    my $ready = $t->wait_for(sub { $readers == grep { -e "$dir/reader-$_" } 0 .. $readers - 1 }, 30);
    my @got;
    for my $k (1 .. $big_stores) {
        my $g = $t->get('/openrouter/api/v1/models', 'X-Profile' => "evict-$k",
                        Authorization => 'Bearer evict');
        my ($seq) = $g->{content} =~ /\A\{"mock_seq":(\d+),/;
        my $want = defined $seq ? '{"mock_seq":' . $seq . ',' . substr($router, 1) : '';
        push @got, { status => $g->{status}, cache => $g->{headers}{'x-modelcache-status'} // '-',
                     exact => (defined $seq && $g->{content} eq $want ? 1 : 0) };
    }
    touch("$dir/evicted");
    return { ready => $ready ? 1 : 0, gets => \@got };
}

$res = $t->parallel($readers + 1, sub {
    my ($i) = @_;
    return $i == $readers ? evictor()
         : slow_reader('/openrouter/api/v1/models', 'reader', "$dir/reader-$i", "$dir/evicted");
}, timeout => 90);

my @rd = @$res[0 .. $readers - 1];
my $ev = $res->[$readers] // {};
ok($ev->{ready}, 'evictor: all readers were half way through before it began');
is(scalar(grep { $_ && $_->{paused} } @rd), $readers, 'readers: all paused half way');
is(scalar(grep { $_->{status} == 200 && $_->{cache} eq 'MISS' && $_->{exact} } @{ $ev->{gets} // [] }),
   $big_stores, "evictor: $big_stores other scopes, each a MISS with its own (stamped) 1 MB list");
is(scalar(grep { $_ && $_->{status} == 200 } @rd), $readers, 'readers: all 200');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @rd), $readers, 'readers: all HIT');
is(scalar(grep { $_ && $_->{len} == length $router } @rd), $readers, 'readers: all got 1 MB')
    or diag(explain([ map { $_ && $_->{len} } @rd ]));
is(scalar(grep { $_ && $_->{same} } @rd), $readers,
   'readers: byte-identical bodies while 40 stores needed the room');

my $b1 = stats('big');
$d = delta($b0, $b1);
is($d->{upstream_fetches}, 1 + $big_stores, 'big: one fetch for the readers\' entry and one per store');
is($t->mock_count('/openrouter/api/v1/models'), 1 + $big_stores, 'big: the provider agrees');
cmp_ok($b1->{entries}, '<=', 4, "big: entries afterwards ($b1->{entries}): only a few 1 MB lists fit");
cmp_ok($d->{evictions}, '>=', 1 + $big_stores - 4, "big: evictions ($d->{evictions})");
is($b1->{entries} + $d->{evictions}, 1 + $big_stores,
   'big: every entry stored is still there or was evicted');
is($d->{errors}, 0, 'big: no error');
is($d->{hits}, $readers, 'big: the readers\' hits');

# pinned all along, it was never the one to go
$r = $t->get('/openrouter/api/v1/models', 'X-Profile' => 'reader');
is("$r->{status} $r->{headers}{'x-modelcache-status'}", '200 HIT',
   'the readers\' entry survived every store: HIT');
ok($r->{content} eq $router, 'and is still the 1 MB list');

$t->log_unlike(qr/\[alert\]/, 'no [alert] so far (no "no room even after eviction")');

# ---- every entry pinned: a list that finds no room is still answered ---------------

my $f0 = stats('full');
for my $k (1 .. 5) {
    my ($st) = ask('/full/v1/models', "full-$k", $router);
    is($st, '200 MISS', "full zone: full-$k stored");
}
my $f1 = stats('full');
# LRU: the zone holds the last ones stored (asking would change that:
# a MISS of an evicted one evicts the next)
cmp_ok($f1->{entries}, '>=', 2, "full zone: $f1->{entries} entries");
cmp_ok($f1->{entries}, '<', 5, 'full zone: fewer than five');
my @present = map { "full-$_" } 6 - $f1->{entries} .. 5;
cmp_ok($f1->{size} - $f1->{used}, '<', length $router,
       'full zone: no room for one more 1 MB list without an eviction');

my $n_present = @present;
my $n_new = 3;
$res = $t->parallel($n_present + 1, sub {
    my ($i) = @_;
    if ($i < $n_present) {
        return slow_reader('/full/v1/models', $present[$i], "$dir/full-reader-$i", "$dir/full-done");
    }
    my $ready = $t->wait_for(sub {
        $n_present == grep { -e "$dir/full-reader-$_" } 0 .. $n_present - 1;
    }, 30);
    my @got = map {
        my $g = $t->get('/full/v1/models', 'X-Profile' => 'full-new');
        { status => $g->{status}, cache => $g->{headers}{'x-modelcache-status'} // '-',
          same => ($g->{content} eq $router ? 1 : 0) };
    } 1 .. $n_new;
    my $s = stats('full');
    touch("$dir/full-done");
    return { ready => $ready ? 1 : 0, gets => \@got, entries => $s->{entries} };
}, timeout => 90);

@rd = @$res[0 .. $n_present - 1];
my $nw = $res->[$n_present] // {};
ok($nw->{ready}, 'full zone: every entry was being read before the new list came');
is_deeply([ map { "$_->{status} $_->{cache} $_->{same}" } @{ $nw->{gets} // [] } ],
          [ ('200 MISS 1') x $n_new ],
          'full zone: a list with no room is answered all the same, 200 with its bytes, each time');
is($nw->{entries}, $n_present, 'full zone: meanwhile, no pinned entry was evicted for it');
is(scalar(grep { $_ && $_->{status} == 200 && $_->{cache} eq 'HIT' && $_->{same} } @rd),
   $n_present, 'full zone: every reader got its byte-identical list');

my $f2 = stats('full');
$d = delta($f1, $f2);
is($d->{evictions}, 0, 'full zone: nothing evicted while everything was pinned');
is($d->{misses}, $n_new, 'full zone: the new list counted as misses');
is($d->{upstream_fetches}, $n_new, 'full zone: one fetch each (nothing stored to wait for)');
is($d->{errors}, 0, 'full zone: no error');
my $NOMEM = qr/modelcache zone "full" has no room for an entry of \d+ bytes even after eviction/;
my @nomem = $t->error_log =~ /\[alert\][^\n]*($NOMEM, serving uncached)/g;
is(scalar @nomem, $n_new, 'full zone: each store that found no room logged at [alert]');

# the readers gone, the new list finds its room
($st) = ask('/full/v1/models', 'full-new', $router);
is($st, '200 MISS', 'full zone, unpinned: the new list is a MISS');
($st, $same) = ask('/full/v1/models', 'full-new', $router);
is("$st $same", '200 HIT 1', 'and now stored: HIT');
is(stats('full')->{evictions} - $f2->{evictions}, 1, 'by evicting the least recently used');

$t->done_testing(allow => [$NOMEM]);
