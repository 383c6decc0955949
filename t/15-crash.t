#!/usr/bin/perl

# Crash safety: a worker SIGKILLed in the middle of a fetch wedges no key,
# and one SIGKILLed while sending an entry leaks no memory; the zone stays
# consistent.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET;
use MCTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:64m max_entry=16m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location /v1/ {
            modelcache              models;
            modelcache_pass         /_provider$uri;
            modelcache_ttl          300s;
            modelcache_lock_timeout 20s;
        }

        location = /purge {
            modelcache_purge models;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

sub stats { MCTest::json_decode($t->get('/stats')->{content}) }

sub kill_workers {
    my @old = $t->worker_pids;
    kill 'KILL', @old;
    # the master respawns them
    return $t->wait_for(sub {
        my @now = $t->worker_pids;
        my %old = map { $_ => 1 } @old;
        @now == 2 && !grep { $old{$_} } @now;
    }, 10);
}

my $empty = stats()->{used};

# a fetch whose worker is killed

$t->mock_route({ path => '/v1/models', fixture => 'openai_models.json',
                 delay_ms => 3000, times => 1 });

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port)
    or die "connect: $!";
print $s "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n";
ok($t->wait_for(sub { $t->mock_count('/v1/models') == 1 }),
   'a fetch is in flight');
ok(kill_workers(), 'the workers were killed and respawned');
close $s;

my $start = time;
my $r = $t->get('/v1/models', Authorization => 'Bearer k');
my $took = time - $start;
is($r->{status}, 200, 'the next request is answered');
ok($r->{content} eq $t->fixture('openai_models.json'), 'with the list');
is($t->mock_count('/v1/models'), 2, 'by a new fetch');
cmp_ok($took, '<', 2.5, 'without waiting for the dead fetch\'s 20 s lock');
is($t->get('/v1/models', Authorization => 'Bearer k')->{headers}
       {'x-modelcache-status'}, 'HIT', 'and it was stored');

# an entry being sent by a worker that is killed

$t->mock_route({ path => '/v1/big', fixture => 'adv_large_12mb.json' });
$r = $t->get('/v1/big');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'a 12 MiB entry stored');

$s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port)
    or die "connect: $!";
$s->setsockopt(SOL_SOCKET, SO_RCVBUF, 4096);
print $s "GET /v1/big HTTP/1.1\r\nHost: x\r\n\r\n";
my $head = '';
while ($head !~ /\r\n\r\n/) {
    sysread($s, $head, 1024, length $head) or last;
}
like($head, qr/X-Modelcache-Status: HIT/, 'a slow reader gets it (HIT)');
my ($pid) = $head =~ /X-Worker: (\d+)/;
ok($pid, 'served by worker ' . ($pid // '?'));

# the reader stops reading: the entry stays pinned by that worker
sleep 0.3;
kill 'KILL', $pid;
ok($t->wait_for(sub { !kill(0, $pid) && $t->worker_pids == 2 }),
   'that worker was killed and respawned');
close $s;

$r = $t->http('PURGE', '/purge');
is($r->{content}, "{\"purged\":2}\n", 'purge: both entries');

# any allocation collects entries whose readers are gone
$t->mock_route({ path => '/v1/small', body => '{"data":[]}' });
is($t->get('/v1/small')->{status}, 200, 'another entry stored');
$r = $t->http('PURGE', '/purge');
is($r->{content}, "{\"purged\":1}\n", 'purge: that one');

my $st = stats();
is($st->{entries}, 0, 'zone: no entries');
is($st->{used}, $empty, 'zone: all its memory back, none leaked');

$t->done_testing(allow => [qr/exited on signal 9/]);
