#!/usr/bin/perl

# What the provider answers and what is stored: non-200 answers are relayed
# unchanged (status, body, Content-Type, WWW-Authenticate, Retry-After) and
# never stored, 401/403 drop the key's entry; a 200 that is not a model list,
# or is encoded, or a broken/refused/timed-out connection gives a 502/504
# JSON error and stores nothing; valid edge-case lists of every provider
# shape are stored byte for byte; one key's errors leave other entries alone.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use JSON::PP ();
use Test::More;
use Time::HiRes qw(sleep);

my $t = MCTest->new;
$t->mock_start;

# /mc/X, /short/X (ttl 2s): the mock's /X; /closed/X: a port nobody listens
# on; /slow/X: the mock with a 1s read timeout; /nopass/X: no such location.

$t->write_conf(<<'EOF');
    # plain TTL expiry: no stale answers here (t/11-stale.t has those)
    modelcache_stale_while_revalidate 0;
    modelcache_stale_if_error         0;

    modelcache_zone zone=models:8m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location ^~ /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location ^~ /_closed/ {
            internal;
            proxy_pass http://127.0.0.1:%%PORT2%%/;
            proxy_set_header Accept-Encoding "";
        }

        location ^~ /_slow/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_read_timeout 1s;
        }

        location ~ ^/mc(?<rest>/.*)$ {
            modelcache      models;
            modelcache_pass /_p$rest$is_args$args;
            modelcache_ttl  300s;
        }

        location ~ ^/short(?<rest>/.*)$ {
            modelcache      models;
            modelcache_pass /_p$rest$is_args$args;
            modelcache_ttl  2s;
        }

        location ~ ^/closed(?<rest>/.*)$ {
            modelcache      models;
            modelcache_pass /_closed$rest;
        }

        location ~ ^/slow(?<rest>/.*)$ {
            modelcache      models;
            modelcache_pass /_slow$rest;
        }

        location ^~ /nopass/ {
            modelcache      models;
            modelcache_pass /_nowhere$uri;
        }

        location = /stats {
            modelcache_stats models;
        }

        location / {
            return 404;
        }
    }
EOF
$t->run;

my $openai = $t->fixture('openai_models.json');
my $errors = 0;    # ERROR answers seen, to check the stats counter

sub req {
    my ($path, %h) = @_;
    my $r = $t->get($path, %h);
    $errors++ if ($r->{headers}{'x-modelcache-status'} // '') eq 'ERROR';
    return $r;
}

sub stats { return MCTest::json_decode($t->get('/stats')->{content}) }

# a 502/504/404 of ours: JSON error shape; returns the message
sub json_error {
    my ($r, $status, $name) = @_;
    is($r->{status}, $status, "$name: $status");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    is($r->{headers}{'x-modelcache-status'}, 'ERROR', "$name: ERROR");
    my $e = MCTest::json_decode($r->{content});
    is(ref $e && ref $e->{error} && $e->{error}{type},
       'modelcache_upstream_error', "$name: error type");
    my $msg = ref $e && ref $e->{error} ? $e->{error}{message} : undef;
    ok(defined $msg && length $msg, "$name: error message");
    return $msg // '';
}

# ---- 401 from the provider -------------------------------------------------

my $bad_body = '{"error":{"message":"Incorrect API key provided",'
             . '"type":"invalid_request_error","param":null,'
             . '"code":"invalid_api_key"}}';

my $r = req('/mc/v1/models', Authorization => 'Bearer bad-key');
is($r->{status}, 401, '401: relayed');
ok($r->{content} eq $bad_body, '401: provider body byte for byte');
is($r->{headers}{'content-type'}, 'application/json', '401: content type');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', '401: ERROR');
ok(!exists $r->{headers}{etag}, '401: no etag of ours');
$r = req('/mc/v1/models', Authorization => 'Bearer bad-key');
is($r->{status}, 401, '401 again');
is($t->mock_count('/v1/models'), 2, '401 not stored: fetched again');

$t->mock_route({ path => '/wa', status => 401,
    content_type => 'application/json; charset=utf-8',
    headers => { 'WWW-Authenticate' => 'Bearer realm="api", error="invalid_token"' },
    body => '{"error":"token expired"}' });
$r = req('/mc/wa', Authorization => 'Bearer old');
is($r->{status}, 401, '401 with WWW-Authenticate: 401');
is($r->{headers}{'www-authenticate'}, 'Bearer realm="api", error="invalid_token"',
   'WWW-Authenticate relayed');
is($r->{headers}{'content-type'}, 'application/json; charset=utf-8',
   'provider content type relayed as is');
is($r->{content}, '{"error":"token expired"}', 'body relayed');

# ---- 401/403 drop an existing entry; other errors leave an expired one ------

for my $p (qw(k401 k403 exp500)) {
    $t->mock_route({ path => "/$p", auth => 'Bearer key-k',
                     fixture => 'openai_models.json' });
    $r = req("/short/$p", Authorization => 'Bearer key-k');
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$p: stored");
    $r = req("/short/$p", Authorization => 'Bearer key-k');
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "$p: a hit");
    is($t->mock_count("/$p"), 1, "$p: one fetch");
}

sleep 3.2;    # ttl 2s: all three expired

for my $code (401, 403) {
    my $p = "k$code";
    $t->mock_route({ path => "/$p", auth => 'Bearer key-k', status => $code,
                     body => "{\"error\":\"denied $code\"}", times => 1 });
    $r = req("/short/$p", Authorization => 'Bearer key-k');
    is($r->{status}, $code, "$p: expired entry, refetch answers $code");
    is($r->{content}, "{\"error\":\"denied $code\"}", "$p: its body");
    is($r->{headers}{'x-modelcache-status'}, 'ERROR', "$p: ERROR");
    $r = req("/short/$p", Authorization => 'Bearer key-k');
    is($r->{status}, 200, "$p: next request 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS',
       "$p: a MISS, not EXPIRED: the entry was deleted");
    ok($r->{content} eq $openai, "$p: the list");
    is($t->mock_count("/$p"), 3, "$p: three fetches");
}

$t->mock_route({ path => '/exp500', auth => 'Bearer key-k', status => 500,
                 body => 'boom', content_type => 'text/plain', times => 1 });
$r = req('/short/exp500', Authorization => 'Bearer key-k');
is($r->{status}, 500, 'expired entry, refetch 500: relayed');
is($r->{content}, 'boom', 'expired entry, refetch 500: body');
$r = req('/short/exp500', Authorization => 'Bearer key-k');
is($r->{headers}{'x-modelcache-status'}, 'EXPIRED',
   'after a 500 the expired entry is still there (EXPIRED)');
ok($r->{content} eq $openai, 'and the good refetch is served');
$r = req('/short/exp500', Authorization => 'Bearer key-k');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'good refetch replaced it');
is($t->mock_count('/exp500'), 3, 'exp500: three fetches');

# ---- 5xx and 429 relayed, not stored; the next good answer is --------------

my %err = (
    500 => { body => 'internal provider error', content_type => 'text/plain' },
    502 => { body => '<html><body>bad gateway</body></html>',
             content_type => 'text/html' },
    503 => { body => '{"error":{"message":"overloaded"}}',
             headers => { 'Retry-After' => '30' } },
    429 => { body => '{"error":{"message":"rate limited","type":"requests"}}',
             headers => { 'Retry-After' => '7' } },
);

for my $code (sort keys %err) {
    my $p = "/err$code";
    my $spec = $err{$code};
    $t->mock_route({ path => $p, fixture => 'openai_models.json' });
    $t->mock_route({ path => $p, status => $code, times => 1, %$spec });
    $r = req("/mc$p");
    is($r->{status}, $code, "$code: relayed");
    is($r->{content}, $spec->{body}, "$code: body unchanged");
    is($r->{headers}{'content-type'}, $spec->{content_type} // 'application/json',
       "$code: content type unchanged");
    is($r->{headers}{'x-modelcache-status'}, 'ERROR', "$code: ERROR");
    is($r->{headers}{'retry-after'}, $spec->{headers}{'Retry-After'},
       "$code: Retry-After relayed") if $spec->{headers};
    $r = req("/mc$p");
    is($r->{status}, 200, "$code: next good answer 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$code: not stored: MISS");
    ok($r->{content} eq $openai, "$code: the list");
    $r = req("/mc$p");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "$code: good answer stored");
    is($t->mock_count($p), 2, "$code: two fetches");
}

$t->mock_route({ path => '/empty403', status => 403, body => '' });
$r = req('/mc/empty403');
is($r->{status}, 403, '403 with an empty body: relayed');
is($r->{content}, '', '403 with an empty body: empty');
is($r->{headers}{'content-length'}, 0, '403 with an empty body: Content-Length 0');

# ---- 404 from the provider --------------------------------------------------

$r = req('/mc/no/such/route');
is($r->{status}, 404, 'provider 404 relayed');
is($r->{content}, '{"error":{"message":"no such route","type":"invalid_request_error"}}',
   'provider 404 body');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', 'provider 404: ERROR');
req('/mc/no/such/route');
is($t->mock_count('/no/such/route'), 2, 'provider 404 not stored');

# ---- a 200 that is not a model list -----------------------------------------

my @not_lists = (
    [ 'invalid JSON',        { fixture => 'adv_invalid_json.json' },
      qr/^provider answered 200 with invalid JSON: / ],
    [ 'truncated',           { fixture => 'adv_truncated.json' },
      qr/^provider answered 200 with invalid JSON: / ],
    [ 'OpenAI error object', { fixture => 'adv_error_object_200.json' },
      qr/^provider answered 200 with an error object$/ ],
    [ 'Anthropic error object', { fixture => 'adv_error_object_200_anthropic.json' },
      qr/^provider answered 200 with an error object$/ ],
    [ 'no model array',      { fixture => 'adv_no_model_array.json' },
      qr/^provider answered 200 without a model list/ ],
    [ 'data not an array',   { fixture => 'adv_data_not_array.json' },
      qr/^provider answered 200 with a model list that is not an array$/ ],
    [ 'mode garbage',        { fixture => 'openai_models.json', mode => 'garbage' },
      qr/^provider answered 200 with invalid JSON: / ],
    [ 'empty body',          { body => '' },
      qr/^provider answered 200 with invalid JSON: / ],
    [ 'array, not object',   { body => '[1,2,3]' },
      qr/^provider answered 200 with JSON that is not an object$/ ],
    # jansson refuses these (documented limitation of this version)
    [ 'deep nesting',        { fixture => 'adv_deep_nesting.json' },
      qr/^provider answered 200 with invalid JSON: maximum parsing depth/ ],
    [ 'numbers out of range', { fixture => 'adv_numbers_out_of_range.json' },
      qr/^provider answered 200 with invalid JSON: .*overflow/ ],
);

my $n = 0;
for my $case (@not_lists) {
    my ($name, $spec, $want) = @$case;
    my $p = '/bad' . ++$n;
    $t->mock_route({ path => $p, %$spec });
    $r = req("/mc$p");
    my $msg = json_error($r, 502, $name);
    like($msg, $want, "$name: message");
    # the log quotes the message escaped as a JSON string is
    my $logged = substr(JSON::PP->new->allow_nonref->encode($msg), 1, -1);
    $t->log_like(qr/\[error\].*modelcache: \Q$logged\E, nothing stored/,
                 "$name: logged, nothing stored");
    $r = req("/mc$p");
    is($r->{status}, 502, "$name: again 502");
    is($t->mock_count($p), 2, "$name: not stored, fetched again");
}

# ---- valid edge-case lists and other provider shapes are stored -------------

my @lists = (
    [ 'empty list',    '/edge/empty',   'adv_empty_list.json' ],
    [ 'duplicate ids', '/edge/dup',     'adv_duplicate_ids.json' ],
    [ 'unicode ids',   '/edge/unicode', 'adv_unicode_ids.json' ],
    [ 'Ollama tags',   '/api/tags',     undef ],
    [ 'Gemini models', '/gemini/v1beta/models', undef ],
    [ 'Anthropic models', '/anthropic/v1/models', undef ],
    [ 'LM Studio api/v0', '/edge/lmstudio', 'lmstudio_api_v0_models.json' ],
);
my %default_fixture = (
    '/api/tags' => 'ollama_tags.json',
    '/gemini/v1beta/models' => 'gemini_models_page1.json',
    '/anthropic/v1/models' => 'anthropic_models_all.json',
);

for my $case (@lists) {
    my ($name, $p, $fixture) = @$case;
    $t->mock_route({ path => $p, fixture => $fixture }) if $fixture;
    my $want = $t->fixture($fixture // $default_fixture{$p});
    $r = req("/mc$p", Authorization => 'Bearer key-a');
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$name: MISS");
    ok($r->{content} eq $want, "$name: byte-identical");
    is($r->{headers}{'content-length'}, length $want, "$name: content length");
    $r = req("/mc$p", Authorization => 'Bearer key-a');
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "$name: stored, HIT");
    ok($r->{content} eq $want, "$name: HIT byte-identical");
    is($t->mock_count($p), 1, "$name: one fetch");
}

# ---- transport failures -----------------------------------------------------

$r = req('/closed/v1/models');
my $msg = json_error($r, 502, 'connection refused');
is($msg, 'provider could not be reached', 'connection refused: message');
$t->log_like(qr/modelcache: provider could not be reached, nothing stored/,
             'connection refused: logged');

$t->mock_route({ path => '/hang', mode => 'hang' });
$r = req('/slow/hang');
$msg = json_error($r, 504, 'provider hangs');
is($msg, 'provider timed out', 'provider hangs: message');
is($t->mock_count('/hang'), 1, 'provider hangs: asked once');

$t->mock_route({ path => '/reset', fixture => 'openai_models.json', mode => 'reset' });
$r = req('/mc/reset');
$msg = json_error($r, 502, 'connection reset');
is($msg, 'provider could not be reached', 'connection reset before any header: message');
req('/mc/reset');
is($t->mock_count('/reset'), 2, 'connection reset: not stored');

$t->mock_route({ path => '/trunc', fixture => 'openai_models.json' });
$t->mock_route({ path => '/trunc', fixture => 'openai_models.json',
                 mode => 'truncate', times => 1 });
$r = req('/mc/trunc');
$msg = json_error($r, 502, 'truncated body');
is($msg, 'provider connection failed during the answer', 'truncated: message');
$t->log_like(qr/\[error\].*modelcache: \Q$msg\E, nothing stored/, 'truncated: logged');
$r = req('/mc/trunc');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'truncated: not stored, MISS next');
ok($r->{content} eq $openai, 'truncated: next answer whole');
is($t->mock_count('/trunc'), 2, 'truncated: two fetches');

$t->mock_route({ path => '/chunked', fixture => 'openai_models.json', mode => 'chunked' });
$r = req('/mc/chunked');
is($r->{status}, 200, 'chunked: 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'chunked: MISS');
ok($r->{content} eq $openai, 'chunked: byte-identical');
is($r->{headers}{'content-length'}, length $openai, 'chunked: content length');
$r = req('/mc/chunked');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'chunked: stored');
ok($r->{content} eq $openai, 'chunked: HIT byte-identical');
is($t->mock_count('/chunked'), 1, 'chunked: one fetch');

# ---- Content-Encoding -------------------------------------------------------

$t->mock_route({ path => '/gz', fixture => 'openai_models.json',
                 headers => { 'Content-Encoding' => 'gzip' } });
$r = req('/mc/gz');
$msg = json_error($r, 502, 'Content-Encoding gzip');
like($msg, qr/Accept-Encoding/, 'Content-Encoding: message names Accept-Encoding');
req('/mc/gz');
is($t->mock_count('/gz'), 2, 'Content-Encoding: not stored');

$t->mock_route({ path => '/identity', fixture => 'openai_models.json',
                 headers => { 'Content-Encoding' => 'identity' } });
$r = req('/mc/identity');
is($r->{status}, 200, 'Content-Encoding identity: 200');
ok($r->{content} eq $openai, 'Content-Encoding identity: the list');
is(req('/mc/identity')->{headers}{'x-modelcache-status'}, 'HIT',
   'Content-Encoding identity: stored');
is($t->mock_count('/identity'), 1, 'Content-Encoding identity: one fetch');

# ---- modelcache_pass to a location that does not exist ----------------------

$r = req('/nopass/v1/models');
$msg = json_error($r, 404, 'missing internal location');
is($msg, 'modelcache_pass location gave no answer', 'missing location: message');

# ---- one key's errors leave another key's fresh entry alone -----------------

$t->mock_route({ path => '/shared', fixture => 'openai_models.json' });
$t->mock_route({ path => '/shared', auth => 'Bearer key-x', status => 401,
                 body => '{"error":"no"}' });
$t->mock_route({ path => '/shared', auth => 'Bearer key-y', status => 403,
                 body => '{"error":"no"}' });
$t->mock_route({ path => '/shared', auth => 'Bearer key-z', status => 500,
                 body => 'down' });
$t->mock_route({ path => '/shared', auth => 'Bearer key-w', body => '[]' });

$r = req('/mc/shared', Authorization => 'Bearer key-a');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'key-a stored');
is(req('/mc/shared', Authorization => 'Bearer key-x')->{status}, 401, 'key-x: 401');
is(req('/mc/shared', Authorization => 'Bearer key-y')->{status}, 403, 'key-y: 403');
is(req('/mc/shared', Authorization => 'Bearer key-z')->{status}, 500, 'key-z: 500');
is(req('/mc/shared', Authorization => 'Bearer key-w')->{status}, 502, 'key-w: 502');
$r = req('/mc/shared', Authorization => 'Bearer key-a');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'key-a still a HIT');
ok($r->{content} eq $openai, 'key-a: its list');
is($t->mock_count('/shared'), 5, 'key-a was not refetched');

# ---- counters ---------------------------------------------------------------

my $s = stats();
is($s->{errors}, $errors, "stats: errors counts every ERROR answer ($errors)");
is($s->{stale}, 0, 'stats: nothing served stale');

$t->done_testing;
