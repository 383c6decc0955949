#!/usr/bin/perl

# Reload under load: nginx -s reload every second (with a config that
# changes each time, the zones' names and sizes kept) while clients ask
# without pause.  No request fails, the entries survive (every answer a HIT,
# no provider fetch) and the counters count each request exactly once across
# all the generations of workers.  Then the same storm over entries that
# expire every 2 s with stale-while-revalidate: all answered from the cache,
# one background refresh per expiry, counters coherent.  And once more over
# new keys with a slow provider, so that reloads come while fetches are in
# flight: single flight holds across the generations (one fetch per key).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

# generation $gen of the config: only the X-Gen header changes
sub conf {
    my ($gen) = @_;
    my $text = <<'EOF';
    modelcache_zone zone=models:8m;
    modelcache_zone zone=swr:8m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;
        add_header X-Gen %%GEN%% always;

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
            modelcache      models;
            modelcache_pass /_p/api/tags;
            modelcache_ttl  300s;
        }

        location = /anthropic/v1/models {
            modelcache      models;
            modelcache_pass /_p/anthropic/v1/models;
            modelcache_ttl  300s;
        }

        location = /stats {
            modelcache_stats models;
        }

        location = /swr/v1/models {
            modelcache                        swr;
            modelcache_pass                   /_p/v1/models?swr=1;
            modelcache_ttl                    2s;
            modelcache_stale_while_revalidate 30s;
        }

        location = /swr/api/tags {
            modelcache                        swr;
            modelcache_pass                   /_p/api/tags?swr=1;
            modelcache_ttl                    2s;
            modelcache_stale_while_revalidate 30s;
        }

        location = /swr/stats {
            modelcache_stats swr;
        }
    }
EOF
    $text =~ s/%%GEN%%/$gen/g;
    return $t->write_conf($text);
}

my @COUNTERS = qw(hits misses expired stale updating bypass errors upstream_fetches
                  evictions purged lock_waits);

sub stats {
    my ($loc) = @_;
    my $r = $t->get($loc);
    my $s = MCTest::json_decode($r->{content});
    die "stats: $r->{status} $r->{content}\n" unless ref $s eq 'HASH';
    return $s;
}

sub delta {
    my ($before, $after) = @_;
    return { map { $_ => $after->{$_} - $before->{$_} } @COUNTERS };
}

my $CLIENTS = 6;
my $RELOADS = 8;
my $dir = $t->dir;
my $gen = 0;

# $CLIENTS children ask for keys ($pick->($j) is the j-th) until the
# reloader has done its $RELOADS reloads, one a second (each waits for the
# new workers); every answer is checked, the first failures kept whole.
sub storm {
    my ($name, $pick, $allowed) = @_;
    my $flag = "$dir/$name-reloaded";
    my $first_gen = $gen + 1;
    $gen += $RELOADS;
    my $res = $t->parallel($CLIENTS + 1, sub {
        my ($i) = @_;
        my $start = time;
        if ($i == $CLIENTS) {
            my (@took, @at);
            for my $k (0 .. $RELOADS - 1) {
                my $at = $start + 1 + $k;
                sleep $at - time if $at > time;
                conf($first_gen + $k);
                my $t0 = time;
                push @at, $t0;
                $t->reload;
                push @took, sprintf '%.2f', time - $t0;
            }
            sleep 0.5;    # some load on the last generation too
            open(my $fh, '>', $flag) or die "$flag: $!\n";
            close $fh;
            return { reloads => scalar @took, took => \@took, at => \@at };
        }
        my (%n, @bad, %workers, %gens, %asked);
        my $deadline = $start + 40;
        my $j = $i;
        while (!-e $flag && time < $deadline) {
            my $key = $pick->($j++);
            $asked{ $key->{path} . ' ' . join ' ', %{ $key->{headers} } } = 1;
            my $r = $t->get($key->{path}, %{ $key->{headers} });
            my $cache = $r->{headers}{'x-modelcache-status'} // '-';
            $n{total}++;
            $n{$cache}++;
            $workers{ $r->{headers}{'x-worker'} // '-' } = 1;
            $gens{ $r->{headers}{'x-gen'} // '-' } = 1;
            next if $r->{status} == 200 && $allowed->{$cache} && $r->{content} eq $key->{body};
            $n{bad}++;
            push @bad, "$key->{path} $r->{status} $cache: " . substr($r->{content}, 0, 300)
                if @bad < 20;
        }
        return { n => \%n, bad => \@bad, workers => [ keys %workers ], gens => [ keys %gens ],
                 asked => [ keys %asked ], timed_out => (-e $flag ? 0 : 1) };
    }, timeout => 60);

    my $reloader = $res->[$CLIENTS];
    my @clients = @$res[0 .. $CLIENTS - 1];
    my (%n, @bad, %workers, %gens, %asked);
    for my $c (grep { $_ } @clients) {
        $n{$_} += $c->{n}{$_} for keys %{ $c->{n} };
        $asked{$_} = 1 for @{ $c->{asked} };
        push @bad, @{ $c->{bad} };
        $workers{$_} = 1 for @{ $c->{workers} };
        $gens{$_} = 1 for @{ $c->{gens} };
    }
    is($reloader && $reloader->{reloads}, $RELOADS, "$name: $RELOADS reloads done")
        or diag(explain($reloader));
    note("$name: reloads took " . join(' ', @{ $reloader ? $reloader->{took} : [] }) . ' s');
    is(scalar(grep { $_ && !$_->{timed_out} } @clients), $CLIENTS,
       "$name: all $CLIENTS clients ran until the last reload");
    cmp_ok($n{total} // 0, '>', 10 * $RELOADS, "$name: load ($n{total} requests)");
    is($n{bad} // 0, 0, "$name: every request 200 " . join('/', sort keys %$allowed)
                        . ' with the list')
        or diag(join "\n", @bad);
    cmp_ok(scalar(keys %workers), '>=', $RELOADS + 1,
           "$name: answers came from the generations of workers (" . scalar(keys %workers) . ')');
    ok($gens{ $first_gen + $RELOADS - 1 }, "$name: the last config answered");
    note("$name: answers by status: " . join ', ', map { "$_ $n{$_}" } sort keys %n);
    $n{keys} = scalar keys %asked;
    $n{reload_at} = $reloader ? $reloader->{at} : [];
    return \%n;
}

conf($gen);
$t->run;

my %fixture = map { $_ => $t->fixture($_) }
    qw(openai_models.json ollama_tags.json anthropic_models_all.json);

# ---- entries survive: every answer a HIT, no fetch -------------------------------

my @keys = (
    { path => '/v1/models', headers => { 'X-Profile' => 'a' }, body => $fixture{'openai_models.json'} },
    { path => '/v1/models', headers => { 'X-Profile' => 'b' }, body => $fixture{'openai_models.json'} },
    { path => '/api/tags', headers => {}, body => $fixture{'ollama_tags.json'} },
    { path => '/anthropic/v1/models', headers => {}, body => $fixture{'anthropic_models_all.json'} },
);

for my $key (@keys) {
    my $r = $t->get($key->{path}, %{ $key->{headers} });
    is("$r->{status} $r->{headers}{'x-modelcache-status'}", '200 MISS', "$key->{path}: stored");
    ok($r->{content} eq $key->{body}, "$key->{path}: the list");
}
my $fetched = $t->mock_total;
is($fetched, 4, 'four fetches');
my $s0 = stats('/stats');
is($s0->{entries}, 4, 'four entries');

my $n = storm('hits', sub { $keys[ $_[0] % @keys ] }, { HIT => 1 });

is($n->{HIT} // 0, $n->{total}, 'hits: all HIT');
is($t->mock_total, $fetched, 'hits: no provider fetch during the reloads');
my $s1 = stats('/stats');
is($s1->{entries}, 4, 'hits: the four entries are still there');
is_deeply(delta($s0, $s1), { (map { $_ => 0 } @COUNTERS), hits => $n->{total} },
          "hits: the hits counter grew by exactly the $n->{total} requests, nothing else moved")
    or diag(explain(delta($s0, $s1)));

for my $key (@keys) {
    my $r = $t->get($key->{path}, %{ $key->{headers} });
    is("$r->{status} $r->{headers}{'x-modelcache-status'} $r->{headers}{'x-gen'}",
       "200 HIT $RELOADS", "after the reloads: $key->{path} HIT, from the last config");
}

# ---- stale-while-revalidate: entries expire every 2 s during the storm ---------------

my @swr = (
    { path => '/swr/v1/models', headers => {}, body => $fixture{'openai_models.json'} },
    { path => '/swr/api/tags', headers => {}, body => $fixture{'ollama_tags.json'} },
);
$t->mock_reset;
for my $key (@swr) {
    my $r = $t->get($key->{path}, %{ $key->{headers} });
    is("$r->{status} $r->{headers}{'x-modelcache-status'}", '200 MISS', "$key->{path}: stored");
}
my $w0 = stats('/swr/stats');
my $w0_time = time;
is($w0->{entries}, 2, 'swr: two entries');

$n = storm('swr', sub { $swr[ $_[0] % @swr ] }, { HIT => 1, STALE => 1, UPDATING => 1 });
my $took = time - $w0_time;

my $refreshes = $t->mock_total - 2;
my $w1 = stats('/swr/stats');
my $d = delta($w0, $w1);
cmp_ok($n->{STALE} // 0, '>=', scalar @swr, "swr: entries expired during the storm ($n->{STALE} STALE)");
is($refreshes, $n->{STALE} // 0, 'swr: one provider fetch per STALE answer (the refresh it started)');
# an entry stored at second S with ttl 2s expires at S + 2: at most one
# refresh per key and second, and one more for the last one
cmp_ok($refreshes, '<=', @swr * (int($took) + 1) + 2,
       sprintf 'swr: %d refreshes for 2 keys over %.1f s', $refreshes, $took);
is($n->{HIT} + ($n->{STALE} // 0) + ($n->{UPDATING} // 0), $n->{total},
   'swr: every answer HIT, STALE or UPDATING');
is_deeply($d, { (map { $_ => 0 } @COUNTERS),
                hits => $n->{HIT}, stale => $n->{STALE} // 0, updating => $n->{UPDATING} // 0,
                upstream_fetches => $refreshes },
          'swr: counters: each answer counted once by its status, one fetch per refresh')
    or diag(explain($d));
is($w1->{entries}, 2, 'swr: still two entries');
is($d->{evictions}, 0, 'swr: nothing evicted');

# the refreshed entries are served fresh once more
sleep 0.3;
for my $key (@swr) {
    my $r = $t->get($key->{path}, %{ $key->{headers} });
    is($r->{status}, 200, "after the storm: $key->{path} 200");
    ok($r->{content} eq $key->{body}, "after the storm: $key->{path} the list");
}

# ---- misses: fetches in flight across the reloads, single flight still ----------------

# A new key every 250 ms, asked by all the clients at once; the provider
# takes 200 ms, so most reloads happen while a fetch is in flight, its owner
# in an old worker and requests waiting for it in new ones.
$t->mock_reset;
$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json', delay_ms => 200 });
my $m0 = stats('/stats');
my $base = time;
$n = storm('misses', sub {
    { path => '/v1/models', headers => { 'X-Profile' => 'slot-' . int((time - $base) * 4) },
      body => $fixture{'openai_models.json'} };
}, { HIT => 1, MISS => 1 });

my $m1 = stats('/stats');
$d = delta($m0, $m1);
cmp_ok($n->{keys}, '>=', $RELOADS, "misses: $n->{keys} keys asked");
my @fetches = grep { $_->{path} eq '/v1/models' } @{ $t->mock_stats->{requests} };
my $overlap = grep {
    my $at = $_;
    grep { $_->{t_start} <= $at && (!defined $_->{t_end} || $at <= $_->{t_end}) } @fetches;
} @{ $n->{reload_at} };
cmp_ok($overlap, '>=', 1, "misses: $overlap of the $RELOADS reloads came with a fetch in flight");
is($t->mock_count('/v1/models'), $n->{keys}, 'misses: one provider fetch per key');
is($n->{MISS} // 0, $n->{keys}, 'misses: one MISS per key');
is(($n->{HIT} // 0) + ($n->{MISS} // 0), $n->{total}, 'misses: the others HIT');
is_deeply($d, { (map { $_ => 0 } @COUNTERS), hits => $n->{HIT} // 0, misses => $n->{keys},
                upstream_fetches => $n->{keys}, lock_waits => $d->{lock_waits} },
          'misses: counters: each answer counted once, one fetch per key')
    or diag(explain($d));
cmp_ok($d->{lock_waits}, '>', 0, "misses: requests waited for a fetch ($d->{lock_waits})");
is($m1->{entries}, $m0->{entries} + $n->{keys}, 'misses: every key stored');

my @reloads = $t->error_log =~ /signal 1 \(SIGHUP\) received[^\n]*reconfiguring/g;
is(scalar @reloads, 3 * $RELOADS, 'the error log has every reload');
$t->log_unlike(qr/\[alert\]/, 'no [alert]');
$t->done_testing;
