#!/usr/bin/perl
# Self-test of the test machinery: the mock provider and MCTest, with a stock
# nginx (no modelcache module).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use HTTP::Tiny;
use IO::Socket::INET;
use Test::More;
use Time::HiRes qw(time);

use MCTest;

my $t = MCTest->new;
$t->mock_start;

my %DEFAULT_ROUTES = (
    '/v1/models'                => 'openai_models.json',
    '/anthropic/v1/models'      => 'anthropic_models_all.json',
    '/api/tags'                 => 'ollama_tags.json',
    '/openrouter/api/v1/models' => 'openrouter_models.json',
    '/lmstudio/v1/models'       => 'lmstudio_v1_models.json',
    '/gemini/v1beta/models'     => 'gemini_models_page1.json',
    '/big'                      => 'adv_large_12mb.json',
);

sub mock_get {
    my ($path, %headers) = @_;
    return $t->http('GET', $path, port => $t->mock_port, headers => \%headers);
}

# Raw HTTP/1.1 exchange, for answers HTTP::Tiny would hide (short bodies, chunks).
sub raw_get {
    my ($path) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $t->mock_port,
        Proto => 'tcp', Timeout => 5) or die "connect: $!";
    print {$sock} "GET $path HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n";
    local $SIG{ALRM} = sub { die "raw_get $path: timeout\n" };
    alarm 10;
    my $raw = do { local $/; <$sock> } // '';
    alarm 0;
    my ($head, $body) = split /\r\n\r\n/, $raw, 2;
    return ($head, $body // '');
}

sub dechunk {
    my ($body) = @_;
    my ($data, $chunks) = ('', 0);
    while ($body =~ s/\A([0-9a-fA-F]+)\r\n//) {
        my $size = hex $1;
        last if $size == 0;
        $data .= substr($body, 0, $size, '');
        $body =~ s/\A\r\n// or return;
        $chunks++;
    }
    return ($data, $chunks);
}

sub elapsed(&) {
    my ($code) = @_;
    my $start = time;
    my @r = $code->();
    return (time - $start, @r);
}

subtest 'default routes serve the fixture bytes' => sub {
    for my $path (sort keys %DEFAULT_ROUTES) {
        my $r = mock_get($path);
        is($r->{status}, 200, "$path status");
        is($r->{headers}{'content-type'}, 'application/json', "$path content type");
        ok($r->{content} eq $t->fixture($DEFAULT_ROUTES{$path}), "$path body is the fixture");
    }
    my $r = mock_get('/nope');
    is($r->{status}, 404, 'unknown path is 404');
    is_deeply(MCTest::json_decode($r->{content}),
        { error => { message => 'no such route', type => 'invalid_request_error' } },
        '404 body is an OpenAI-style error');

    my $h = $t->http('HEAD', '/v1/models', port => $t->mock_port);
    is($h->{status}, 200, 'HEAD status');
    is($h->{headers}{'content-length'}, length $t->fixture('openai_models.json'), 'HEAD length');
    is($h->{content}, '', 'HEAD has no body');
};

subtest 'credential routing' => sub {
    my $profile_b = $t->fixture('openai_models_profile_b.json');
    ok(mock_get('/v1/models', Authorization => 'Bearer key-b')->{content} eq $profile_b,
        'Authorization: Bearer key-b gets profile B');
    ok(mock_get('/v1/models', 'x-api-key' => 'Bearer key-b')->{content} eq $profile_b,
        'x-api-key with the same value matches too');
    ok(mock_get('/v1/models', Authorization => 'Bearer key-a')->{content}
        eq $t->fixture('openai_models.json'), 'another key falls back to the path-only route');

    my $bad = mock_get('/v1/models', Authorization => 'Bearer bad-key');
    is($bad->{status}, 401, 'bad key is 401');
    is(MCTest::json_decode($bad->{content})->{error}{code}, 'invalid_api_key', '401 error body');

    $t->mock_route({ path => '/anthropic/v1/models', auth => 'sk-ant-test',
                     fixture => 'anthropic_models_page1.json' });
    ok(mock_get('/anthropic/v1/models', 'x-api-key' => 'sk-ant-test')->{content}
        eq $t->fixture('anthropic_models_page1.json'), 'custom x-api-key route');
    ok(mock_get('/anthropic/v1/models', 'api-key' => 'sk-ant-test')->{content}
        eq $t->fixture('anthropic_models_page1.json'), 'api-key header matches too');
};

subtest 'counters and request log' => sub {
    $t->mock_reset;
    is($t->mock_total, 0, 'reset zeroes the total');
    mock_get('/v1/models') for 1 .. 3;
    mock_get('/v1/models?limit=5', Authorization => 'Bearer key-b');
    mock_get('/api/tags');

    my $s = $t->mock_stats;
    is($s->{total}, 5, 'total');
    is($t->mock_count('/v1/models'), 4, 'by_path /v1/models');
    is($t->mock_count('/never'), 0, 'by_path of an unseen path is 0');
    is($s->{by_auth}{'Bearer key-b'}, 1, 'by_auth for key-b');
    is($s->{by_auth}{''}, 4, 'by_auth for no credential');
    is($s->{in_flight}, 0, 'nothing in flight');

    my $last = $s->{requests}[3];
    is_deeply([ @$last{qw(seq method path query auth)} ],
        [ 4, 'GET', '/v1/models', 'limit=5', 'Bearer key-b' ], 'request record');
    is($last->{headers}{authorization}, 'Bearer key-b', 'headers are recorded lowercased');
    ok($last->{t_end} >= $last->{t_start}, 't_end after t_start');

    $t->mock_stats for 1 .. 3;
    $t->mock_route({ path => '/x', body => 'x' });
    is($t->mock_total, 5, 'control requests are not counted');
};

subtest 'times: the next N requests, then fall back' => sub {
    $t->mock_route({ path => '/v1/models', status => 500, body => '{"error":"boom"}', times => 2 });
    is(mock_get('/v1/models')->{status}, 500, 'first request fails');
    is(mock_get('/v1/models')->{status}, 500, 'second request fails');
    my $r = mock_get('/v1/models');
    is($r->{status}, 200, 'third request falls back');
    ok($r->{content} eq $t->fixture('openai_models.json'), 'to the default body');
};

subtest 'mode hang' => sub {
    $t->mock_route({ path => '/hang', mode => 'hang' });
    my $ua = HTTP::Tiny->new(timeout => 2, keep_alive => 0);
    my ($secs, $r) = elapsed { $ua->get('http://127.0.0.1:' . $t->mock_port . '/hang') };
    is($r->{status}, 599, 'client gives up');
    like($r->{content}, qr/timed out/i, 'with a timeout');
    ok($secs >= 1.9 && $secs < 10, "after the client's timeout (${secs}s)");
    my $idle = $t->wait_for(sub { $t->mock_stats->{in_flight} == 0 }, 5);
    ok($idle, 'the mock notices the client closed');
};

subtest 'mode reset' => sub {
    $t->mock_route({ path => '/reset', mode => 'reset' });
    my $r = mock_get('/reset');
    is($r->{status}, 599, 'connection error');
    like($r->{content}, qr/reset by peer/i, 'by a TCP reset');
};

subtest 'mode truncate' => sub {
    my $fixture = $t->fixture('openai_models.json');
    $t->mock_route({ path => '/truncate', mode => 'truncate', fixture => 'openai_models.json' });
    my ($head, $body) = raw_get('/truncate');
    like($head, qr/^Content-Length: ${\ length $fixture}\r?$/mi, 'announces the full length');
    is(length $body, int(length($fixture) / 2), 'sends half of it');
    ok($body eq substr($fixture, 0, length $body), 'the first half');

    my $before = $t->mock_count('/truncate');
    is(mock_get('/truncate')->{status}, 599, 'MCTest::http reports the short body as 599');
    is($t->mock_count('/truncate') - $before, 1, 'without retrying the request');
};

subtest 'mode garbage' => sub {
    $t->mock_route({ path => '/garbage', mode => 'garbage', status => 200 });
    my $r = mock_get('/garbage');
    is($r->{status}, 200, 'status as given');
    is($r->{content}, 'this is not json {{{', 'garbage body');
    is(MCTest::json_decode($r->{content}), undef, 'json_decode returns undef on it');
};

subtest 'mode chunked' => sub {
    my $fixture = $t->fixture('openai_models.json');
    $t->mock_route({ path => '/chunked', mode => 'chunked', fixture => 'openai_models.json' });
    my $r = mock_get('/chunked');
    is($r->{headers}{'transfer-encoding'}, 'chunked', 'Transfer-Encoding: chunked');
    ok($r->{content} eq $fixture, 'decoded body is the fixture');
    my ($data, $chunks) = dechunk((raw_get('/chunked'))[1]);
    ok(defined $data && $data eq $fixture, 'raw chunk framing is valid');
    ok($chunks >= 10, "in several chunks ($chunks)");
};

subtest 'mode stamp' => sub {
    $t->mock_route({ path => '/stamp', mode => 'stamp', fixture => 'openai_models.json' });
    my @bodies = map { mock_get('/stamp')->{content} } 1 .. 2;
    isnt($bodies[0], $bodies[1], 'two fetches differ');
    my @seq = map { (MCTest::json_decode($_) // {})->{mock_seq} } @bodies;
    ok(defined $seq[0] && defined $seq[1], 'both are JSON with mock_seq');
    is($seq[1], $seq[0] + 1, 'mock_seq is the request sequence number');
};

subtest 'delay and concurrency' => sub {
    $t->mock_reset;
    $t->mock_route({ path => '/slow', delay_ms => 300, body => '{"slow":true}' });
    my ($secs, $r) = elapsed { mock_get('/slow') };
    is($r->{status}, 200, 'delayed answer');
    ok($secs >= 0.3, "took at least the delay (${secs}s)");

    ($secs, my $results) = elapsed {
        $t->parallel(50, sub { mock_get('/slow')->{status} }, timeout => 30);
    };
    is_deeply($results, [ (200) x 50 ], 'parallel(50): every child got a 200');
    ok($secs < 5, "50 x 300 ms requests overlap (${secs}s)");
    cmp_ok($t->mock_stats->{max_in_flight}, '>=', 20, 'max_in_flight');
    is_deeply($t->parallel(3, sub { [ $_[0], 'x' ] }), [ [ 0, 'x' ], [ 1, 'x' ], [ 2, 'x' ] ],
        'parallel returns values in order');
};

subtest 'stock nginx: start, proxy, reload' => sub {
    $t->write_conf(<<'HTTP', load_module => 0);
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { return 200 "ok"; }
        location /up/ {
            client_body_in_file_only clean;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
        }
    }
HTTP
    unlike($t->conf_text, qr/load_module|%%/, 'no load_module, placeholders substituted');
    my ($code, $out) = $t->nginx_test;
    is($code, 0, 'nginx -t passes') or diag($out);

    $t->run;
    my $r = $t->get('/');
    is_deeply([ $r->{status}, $r->{content} ], [ 200, 'ok' ], 'GET / is 200 "ok"');
    is($t->http('PURGE', '/')->{status}, 200, 'custom method');
    ok($t->get('/up/big')->{content} eq $t->fixture('adv_large_12mb.json'),
        'proxy_pass to the mock (HTTP/1.0 upstream), 12 MiB body');
    my $post = $t->http('POST', '/up/v1/models', body => 'x' x 100_000);
    is($post->{status}, 200, 'request body written to client_body temp by a worker (nobody)');

    my @before = $t->worker_pids;
    is(scalar @before, 2, 'two workers');
    $t->reload;
    my @after = $t->worker_pids;
    is(scalar @after, 2, 'two workers after reload');
    my %old = map { $_ => 1 } @before;
    ok(!grep({ $old{$_} } @after), 'all workers are new');
    is($t->get('/')->{content}, 'ok', 'still serving');
};

$t->done_testing;
