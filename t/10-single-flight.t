#!/usr/bin/perl

# Single flight across workers: however many requests miss one key at once,
# the provider sees one fetch; waiters get its answer (or its error) as soon
# as it ends; modelcache_lock_timeout; a lock whose owner went away.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:8m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location /v1/ {
            modelcache      models;
            modelcache_pass /_provider$uri;
            modelcache_ttl  300s;
        }

        location /short/ {
            modelcache              models;
            modelcache_pass         /_provider/v1/models?short=1;
            modelcache_lock_timeout 500ms;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

my $fixture = $t->fixture('openai_models.json');

sub stampede {
    my ($n, $path, %headers) = @_;
    return $t->parallel($n, sub {
        my $r = $t->get($path, %headers);
        return {
            status => $r->{status},
            cache  => $r->{headers}{'x-modelcache-status'} // '',
            body   => $r->{content},
            worker => $r->{headers}{'x-worker'},
            done   => time,
        };
    });
}

sub stats { MCTest::json_decode($t->get('/stats')->{content}) }

# a cold stampede: one fetch, everybody answered right after it

$t->mock_route({ path => '/v1/models', auth => 'Bearer cold',
                 fixture => 'openai_models.json', delay_ms => 300 });

my $res = stampede(100, '/v1/models', Authorization => 'Bearer cold');

is($t->mock_count('/v1/models'), 1, 'stampede of 100: one provider fetch');
is(scalar(grep { $_ && $_->{status} == 200 } @$res), 100, 'all 200');
is(scalar(grep { $_ && $_->{body} eq $fixture } @$res), 100,
   'all got the provider\'s bytes');
is(scalar(grep { $_ && $_->{cache} eq 'MISS' } @$res), 1, 'one MISS');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @$res), 99,
   'the 99 that waited are answered from the entry');
my %workers = map { $_->{worker} => 1 } grep { $_ } @$res;
is(scalar keys %workers, 2, 'the stampede reached both workers');

# waiters are not left on a coarse poll: a correctness bound far below
# nginx's 500 ms lock poll (the figures themselves are in bench/)
my $fetch_end = $t->mock_stats->{requests}[0]{t_end};
my @late = grep { $_ && $_->{done} - $fetch_end > 0.25 } @$res;
is(scalar @late, 0, 'every waiter answered within 250 ms of the fetch');

my $s = stats();
is($s->{lock_waits}, 99, 'stats: 99 lock waits');
is($s->{upstream_fetches}, 1, 'stats: 1 upstream fetch');
is($s->{hits}, 99, 'stats: 99 hits');
is($s->{misses}, 1, 'stats: 1 miss');

# different keys do not wait for each other

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => "Bearer k$_",
                 fixture => 'openai_models.json', delay_ms => 300 })
    for 1 .. 4;
$res = $t->parallel(20, sub {
    my $r = $t->get('/v1/models', Authorization => 'Bearer k' . ($_[0] % 4 + 1));
    return $r->{status};
});
is(scalar(grep { defined && $_ == 200 } @$res), 20, 'four keys: all 200');
is($t->mock_count('/v1/models'), 4, 'four keys: four fetches');

# a fetch that fails releases its waiters at once, with its answer

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => 'Bearer err', status => 503,
                 body => '{"error":{"message":"overloaded"}}',
                 delay_ms => 300 });
$res = stampede(30, '/v1/models', Authorization => 'Bearer err');
is($t->mock_count('/v1/models'), 1, 'failed stampede: one provider fetch');
is(scalar(grep { $_ && $_->{status} == 503 } @$res), 30,
   'all 30 get the provider\'s 503');
is(scalar(grep { $_ && $_->{body} eq '{"error":{"message":"overloaded"}}' }
          @$res), 30, 'with its body');
is(scalar(grep { $_ && $_->{cache} eq 'ERROR' } @$res), 30, 'all ERROR');
$fetch_end = $t->mock_stats->{requests}[0]{t_end};
@late = grep { $_ && $_->{done} - $fetch_end > 0.25 } @$res;
is(scalar @late, 0, 'released within 250 ms of the failed fetch');

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => 'Bearer gone',
                 mode => 'reset', delay_ms => 300 });
$res = stampede(20, '/v1/models', Authorization => 'Bearer gone');
is($t->mock_count('/v1/models'), 1, 'reset stampede: one provider fetch');
is(scalar(grep { $_ && $_->{status} == 502 } @$res), 20, 'all 20 get 502');
is(scalar(grep { $_ && ($_->{body} // '') =~ /modelcache_upstream_error/ }
          @$res), 20, 'with the JSON error');

# after a failure the next request fetches again

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => 'Bearer err',
                 fixture => 'openai_models.json' });
my $r = $t->get('/v1/models', Authorization => 'Bearer err');
is($r->{status}, 200, 'after the failure: a new fetch');
is($t->mock_count('/v1/models'), 1, 'one more fetch');

# a list over max_entry is not stored: the waiters fetch for themselves

$t->mock_reset;
$t->mock_route({ path => '/v1/big', fixture => 'adv_large_12mb.json',
                 delay_ms => 300 });
$res = $t->parallel(4, sub {
    my $r = $t->get('/v1/big');
    return { status => $r->{status}, len => length($r->{content} // '') };
});
is(scalar(grep { $_ && $_->{status} == 200 && $_->{len} == 12582912 } @$res),
   4, 'too large to store: all four still get the whole list');
cmp_ok($t->mock_count('/v1/big'), '<=', 4, 'at most one fetch each');

# lock timeout: a waiter fetches for itself, and its answer is stored

$t->mock_reset;
$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp', delay_ms => 1500, times => 1 });
$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp' });

$res = $t->parallel(2, sub {
    sleep 0.2 * $_[0];
    my $start = time;
    my $r = $t->get('/short/x', Authorization => 'Bearer lt');
    return { status => $r->{status}, took => time - $start,
             cache => $r->{headers}{'x-modelcache-status'} };
});
is($res->[0]{status}, 200, 'lock timeout: the slow owner answers 200');
is($res->[1]{status}, 200, 'lock timeout: the waiter answers 200');
cmp_ok($res->[1]{took}, '<', 1.2, 'the waiter did not wait for the owner');
is($t->mock_count('/v1/models'), 2, 'lock timeout: two fetches');
$t->log_like(qr/modelcache: lock timeout/, 'lock timeout logged at info');

# the owner's client goes away: a waiter takes over at once

$t->mock_reset;
$t->mock_route({ path => '/v1/models', auth => 'Bearer abort',
                 fixture => 'openai_models.json', delay_ms => 1500 });

$res = $t->parallel(2, sub {
    if ($_[0] == 0) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port)
            or return 'no socket';
        print $s "GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                 . "Authorization: Bearer abort\r\n\r\n";
        sleep 0.3;
        close $s;
        return 'closed';
    }
    sleep 0.1;
    my $start = time;
    my $r = $t->get('/v1/models', Authorization => 'Bearer abort');
    return { status => $r->{status}, took => time - $start };
});
is($res->[0], 'closed', 'the owner\'s client closed its connection');
is($res->[1]{status}, 200, 'the waiter still gets the list');
cmp_ok($res->[1]{took}, '<', 4.5,
       'without waiting for the 5 s lock timeout');

$t->done_testing;
