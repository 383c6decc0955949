#!/usr/bin/perl

# modelcache_bypass: an explicit refresh is never answered from the cache;
# a good answer replaces the entry, a bad one leaves it; a burst of
# refreshes is one fetch; a fetch begun before the refresh arrived is not
# taken as its answer.

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
        }

        location = /v1/models {
            modelcache        models;
            modelcache_pass   /_provider/v1/models;
            modelcache_ttl    300s;
            modelcache_bypass $arg_nocache $http_x_refresh;
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

sub get {
    my ($path, %headers) = @_;
    my $r = $t->get($path, Authorization => 'Bearer by', %headers);
    return { status => $r->{status}, seq => seq_of($r->{content}),
             cache => $r->{headers}{'x-modelcache-status'} // '' };
}

$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp' });

my $r = get('/v1/models');
is($r->{cache}, 'MISS', 'stored');
my $first = $r->{seq};

# values that do not bypass

is(get('/v1/models?nocache=0')->{cache}, 'HIT', 'nocache=0: HIT');
is(get('/v1/models?nocache=')->{cache}, 'HIT', 'nocache=: HIT');
is(get('/v1/models', 'X-Refresh' => '0')->{cache}, 'HIT', 'X-Refresh: 0: HIT');
is($t->mock_count('/v1/models'), 1, 'no fetch for them');

# one refresh

$r = get('/v1/models?nocache=1');
is($r->{status}, 200, 'bypass: 200');
is($r->{cache}, 'BYPASS', 'bypass: BYPASS');
cmp_ok($r->{seq}, '>', $first, 'bypass: a new list from the provider');
my $second = $r->{seq};
$r = get('/v1/models');
is($r->{cache}, 'HIT', 'after the bypass: HIT');
is($r->{seq}, $second, 'with the new list: it replaced the entry');
is(get('/v1/models', 'X-Refresh' => 'yes')->{cache}, 'BYPASS',
   'any of the values bypasses');

# ten users pressing refresh together: one fetch

$t->mock_reset;
$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp', delay_ms => 300 });
my $res = $t->parallel(10, sub { get('/v1/models?nocache=1') });
is($t->mock_count('/v1/models'), 1, 'ten refreshes together: one fetch');
is(scalar(grep { $_ && $_->{status} == 200 && $_->{cache} eq 'BYPASS' }
          @$res), 10, 'all ten BYPASS');
my %seqs = map { $_->{seq} => 1 } grep { $_ } @$res;
is(scalar keys %seqs, 1, 'all ten got the same new list');
my ($burst) = keys %seqs;
cmp_ok($burst, '>', 0, 'a stamped one');
is(get('/v1/models')->{seq}, $burst, 'and it is the entry now');

# a failed refresh leaves the entry

$t->mock_reset;
$t->mock_route({ path => '/v1/models', status => 503, body => 'busy',
                 times => 1 });
$r = get('/v1/models?nocache=1');
is($r->{status}, 503, 'a failed refresh: the provider\'s error');
is($r->{cache}, 'ERROR', 'a failed refresh: ERROR');
$r = get('/v1/models');
is($r->{cache}, 'HIT', 'the entry is intact');
is($r->{seq}, $burst, 'with the list it had');

$t->mock_route({ path => '/v1/models', fixture => 'adv_invalid_json.json',
                 times => 1 });
$r = get('/v1/models?nocache=1');
is($r->{status}, 502, 'an invalid refresh: 502');
is(get('/v1/models')->{seq}, $burst, 'the entry is intact');

# a fetch begun before the refresh arrived is not its answer

$t->mock_reset;
$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 mode => 'stamp', delay_ms => 600 });
$res = $t->parallel(2, sub {
    if ($_[0] == 0) {
        return get('/v1/models', Authorization => 'Bearer older');
    }
    sleep 0.2;
    return get('/v1/models?nocache=1', Authorization => 'Bearer older');
});
is($res->[0]{cache}, 'MISS', 'a miss began a fetch');
is($res->[1]{cache}, 'BYPASS', 'a refresh arrived during it');
is($t->mock_count('/v1/models'), 2, 'the refresh fetched again after it');
cmp_ok($res->[1]{seq}, '>', $res->[0]{seq},
       'and got the newer list, not the older fetch\'s');

my $s = MCTest::json_decode($t->get('/stats')->{content});
# 1 + 1 + 10 + 1 good refreshes; the two failed ones count as errors
is($s->{bypass}, 13, 'stats: bypass counts the bypass answers');

$t->done_testing;
