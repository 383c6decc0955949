#!/usr/bin/perl

# Stale-while-revalidate (one background refresh however many requests,
# also when the request itself is a subrequest) and stale-if-error (which
# failures, which window); nginx -s quit with a refresh in flight.

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

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_read_timeout 1s;
        }

        # stale-while-revalidate
        location /swr/ {
            modelcache                        models;
            modelcache_pass                   /_provider/v1/models?swr=1;
            modelcache_ttl                    2s;
            modelcache_stale_while_revalidate 30s;
            modelcache_stale_if_error         0;
        }

        # a short window, then single flight again
        location /swr-short/ {
            modelcache                        models;
            modelcache_pass                   /_provider/v1/models?short=1;
            modelcache_ttl                    1s;
            modelcache_stale_while_revalidate 1s;
            modelcache_stale_if_error         0;
        }

        # stale-if-error only
        location /sie/ {
            modelcache                        models;
            modelcache_pass                   /_provider/v1/models?sie=1;
            modelcache_ttl                    1s;
            modelcache_stale_while_revalidate 0;
            modelcache_stale_if_error         60s;
        }

        location /sie-short/ {
            modelcache                        models;
            modelcache_pass                   /_provider/v1/models?sies=1;
            modelcache_ttl                    1s;
            modelcache_stale_while_revalidate 0;
            modelcache_stale_if_error         1s;
        }

        # the modelcache request is itself a subrequest (SSI include)
        location = /page {
            ssi on;
            default_type text/html;
            return 200 '[<!--# include virtual="/swr/x" -->]';
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

sub seq_of {
    my ($body) = @_;
    return ($body // '') =~ /"mock_seq":(\d+)/ ? $1 : -1;
}

sub burst {
    my ($n, $path, %headers) = @_;
    return $t->parallel($n, sub {
        my $start = time;
        my $r = $t->get($path, %headers);
        return { status => $r->{status}, took => time - $start,
                 cache => $r->{headers}{'x-modelcache-status'} // '',
                 seq => seq_of($r->{content}), age => $r->{headers}{age},
                 cc => $r->{headers}{'cache-control'} };
    });
}

sub stamp_route {
    my (%extra) = @_;
    $t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                     mode => 'stamp', %extra });
}

# stale-while-revalidate: one refresh for a burst, all served at once

stamp_route(delay_ms => 300);

my $r = $t->get('/swr/a', Authorization => 'Bearer swr');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'swr: first a MISS');
my $first = seq_of($r->{content});
cmp_ok($first, '>', 0, 'swr: a stamped body');

sleep 3.2;

my $res = burst(20, '/swr/a', Authorization => 'Bearer swr');
is(scalar(grep { $_ && $_->{status} == 200 } @$res), 20, 'swr burst: all 200');
is(scalar(grep { $_ && $_->{seq} == $first } @$res), 20,
   'swr burst: all served the stale entry');
is(scalar(grep { $_ && $_->{cache} eq 'STALE' } @$res), 1,
   'swr burst: the one that started the refresh is STALE');
is(scalar(grep { $_ && $_->{cache} eq 'UPDATING' } @$res), 19,
   'swr burst: the others are UPDATING');
is(scalar(grep { $_ && $_->{took} < 0.25 } @$res), 20,
   'swr burst: nobody waited for the 300 ms provider');
is(scalar(grep { $_ && $_->{cc} eq 'private, max-age=0' } @$res), 20,
   'stale answers: max-age=0');
is(scalar(grep { $_ && $_->{age} >= 2 } @$res), 20, 'stale answers: Age');

ok($t->wait_for(sub { $t->mock_count('/v1/models') == 2 }),
   'exactly one background refresh');
sleep 0.5;
is($t->mock_count('/v1/models'), 2, 'and no more');

$r = $t->get('/swr/a', Authorization => 'Bearer swr');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'after the refresh: HIT');
cmp_ok(seq_of($r->{content}), '>', $first, 'with the refreshed body');

# the request that starts a refresh closes its keep-alive connection:
# nginx holds a connection until its background subrequest ends, and the
# client's next request on it would wait for the provider

sub keepalive_get {
    my ($path, $auth) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port,
                                  Timeout => 10) or return undef;
    print $s "GET $path HTTP/1.1\r\nHost: x\r\nAuthorization: $auth\r\n\r\n";
    my $head = '';
    while ($head !~ /\r\n\r\n/) {
        my $n = sysread($s, $head, 4096, length $head) or last;
    }
    close $s;
    return $head;
}

sleep 3.2;
stamp_route(delay_ms => 300);
my $head = keepalive_get('/swr/a', 'Bearer swr');
like($head, qr/X-Modelcache-Status: STALE/, 'keep-alive request: STALE');
like($head, qr/Connection: close/i, 'the one starting a refresh: Connection: close');
$head = keepalive_get('/swr/a', 'Bearer swr');
like($head, qr/X-Modelcache-Status: UPDATING/, 'next request: UPDATING');
like($head, qr/Connection: keep-alive/i, 'an UPDATING answer keeps the connection');
ok($t->wait_for(sub { $t->mock_count('/v1/models') == 3 }), 'refreshed');

# beyond the window: a miss again, single flight

$t->mock_reset;
stamp_route(delay_ms => 300);
$r = $t->get('/swr-short/a', Authorization => 'Bearer short');
sleep 3.2;
$res = burst(10, '/swr-short/a', Authorization => 'Bearer short');
is(scalar(grep { $_ && $_->{status} == 200 } @$res), 10,
   'past the window: all 200');
is(scalar(grep { $_ && $_->{cache} eq 'EXPIRED' } @$res), 1,
   'past the window: one EXPIRED fetch');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @$res), 9,
   'past the window: the others waited for it');
is(scalar(grep { $_ && $_->{seq} > seq_of($r->{content}) } @$res), 10,
   'past the window: everybody got the new list');
is($t->mock_count('/v1/models'), 2, 'past the window: one more fetch');

# the request is itself a subrequest

$t->mock_reset;
stamp_route();
$r = $t->get('/page', Authorization => 'Bearer ssi');
is($r->{status}, 200, 'ssi: 200');
like($r->{content}, qr/^\[\{.*"mock_seq":\d+.*\}\s*\]$/s,
     'ssi: the list inside the page');
my $ssi_first = seq_of($r->{content});
sleep 3.2;
$r = $t->get('/page', Authorization => 'Bearer ssi');
is(seq_of($r->{content}), $ssi_first, 'ssi, expired: the stale list at once');
ok($t->wait_for(sub { $t->mock_count('/v1/models') == 2 }),
   'ssi: the background refresh ran');
$r = $t->get('/page', Authorization => 'Bearer ssi');
cmp_ok(seq_of($r->{content}), '>', $ssi_first, 'ssi: then the new list');
is($t->mock_count('/v1/models'), 2, 'ssi: two fetches in all');

# a failing background refresh keeps the stale entry

$t->mock_reset;
stamp_route();
$r = $t->get('/swr/b', Authorization => 'Bearer swrfail');
$first = seq_of($r->{content});
sleep 3.2;
$t->mock_route({ path => '/v1/models', status => 500, body => 'oops',
                 times => 1 });
$r = $t->get('/swr/b', Authorization => 'Bearer swrfail');
is($r->{headers}{'x-modelcache-status'}, 'STALE', 'refresh fails: STALE');
ok($t->wait_for(sub { $t->mock_count('/v1/models') == 2 }),
   'refresh fails: it was tried');
sleep 0.3;
$r = $t->get('/swr/b', Authorization => 'Bearer swrfail');
is(seq_of($r->{content}), $first, 'refresh failed: the old entry stays');
ok($t->wait_for(sub { $t->mock_count('/v1/models') == 3 }),
   'the next request refreshes again');

# stale-if-error

my %failures = (
    'status 500'   => { status => 500, body => 'oops' },
    'status 503'   => { status => 503, body => 'busy' },
    'status 429'   => { status => 429, body => 'slow down' },
    'timeout'      => { mode => 'hang' },
    'reset'        => { mode => 'reset' },
    'invalid JSON' => { fixture => 'adv_invalid_json.json' },
    'error object' => { fixture => 'adv_error_object_200.json' },
);

my $n = 0;
for my $what (sort keys %failures) {
    my $auth = 'Bearer sie' . $n++;

    $t->mock_reset;
    stamp_route();
    $r = $t->get('/sie/a', Authorization => $auth);
    $first = seq_of($r->{content});
    sleep 2.2;

    $t->mock_route({ path => '/v1/models', times => 1, %{ $failures{$what} } });
    $r = $t->get('/sie/a', Authorization => $auth);
    is($r->{status}, 200, "stale-if-error, $what: 200");
    is($r->{headers}{'x-modelcache-status'}, 'STALE', "$what: STALE");
    is(seq_of($r->{content}), $first, "$what: the stale list");

    $r = $t->get('/sie/a', Authorization => $auth);
    is($r->{headers}{'x-modelcache-status'}, 'EXPIRED',
       "$what: not stored over the entry; the next request fetches");
    cmp_ok(seq_of($r->{content}), '>', $first, "$what: and gets a new list");
}

# waiters of a failed fetch get the stale entry too

$t->mock_reset;
stamp_route();
$r = $t->get('/sie/w', Authorization => 'Bearer siew');
$first = seq_of($r->{content});
sleep 2.2;
$t->mock_route({ path => '/v1/models', status => 503, body => 'busy',
                 delay_ms => 300, times => 1 });
$res = burst(10, '/sie/w', Authorization => 'Bearer siew');
is(scalar(grep { $_ && $_->{cache} eq 'STALE' && $_->{seq} == $first }
          @$res), 10, 'a failed fetch\'s waiters: all STALE');
is($t->mock_count('/v1/models'), 2, 'one fetch for them all');

# 401 and 404 are not provider errors

$t->mock_reset;
stamp_route();
$r = $t->get('/sie/a', Authorization => 'Bearer s401');
sleep 2.2;
$t->mock_route({ path => '/v1/models', status => 401, body => 'no',
                 times => 1 });
$r = $t->get('/sie/a', Authorization => 'Bearer s401');
is($r->{status}, 401, 'a 401 is relayed, not covered by stale-if-error');
$r = $t->get('/sie/a', Authorization => 'Bearer s401');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'and it dropped the entry');

$t->mock_reset;
stamp_route();
$r = $t->get('/sie/a', Authorization => 'Bearer s404');
sleep 2.2;
$t->mock_route({ path => '/v1/models', status => 404, body => 'gone',
                 times => 1 });
$r = $t->get('/sie/a', Authorization => 'Bearer s404');
is($r->{status}, 404, 'a 404 is relayed');

# past the stale-if-error window the error is answered

$t->mock_reset;
stamp_route();
$r = $t->get('/sie-short/a', Authorization => 'Bearer sies');
sleep 3.2;
$t->mock_route({ path => '/v1/models', status => 500, body => 'oops',
                 times => 1 });
$r = $t->get('/sie-short/a', Authorization => 'Bearer sies');
is($r->{status}, 500, 'past the stale-if-error window: the 500');

my $s = MCTest::json_decode($t->get('/stats')->{content});
cmp_ok($s->{stale}, '>=', 18, 'stats: stale counted');
is($s->{updating}, 20, 'stats: updating counted (19 + 1)');

# quit with a background refresh in flight

$t->mock_reset;
stamp_route();
$t->get('/swr/q', Authorization => 'Bearer quit');
sleep 3.2;
stamp_route(delay_ms => 1000);
$r = $t->get('/swr/q', Authorization => 'Bearer quit');
is($r->{headers}{'x-modelcache-status'}, 'STALE', 'a refresh is in flight');
my $start = time;
$t->stop;
cmp_ok(time - $start, '<', 4, 'nginx -s quit exits promptly');

$t->done_testing;
