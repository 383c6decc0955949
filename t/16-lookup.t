#!/usr/bin/perl

# modelcache_lookup: one model object from the cached list, sharing the
# list location's entry (a list and any number of lookups: one fetch);
# ids with '/', '%2F', ':', Ollama and Gemini names; OpenAI-style 404.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use JSON::PP ();
use MCTest;
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:32m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        # as in INTERFACE.md: a list location and a lookup location
        location = /v1/models {
            modelcache       models;
            modelcache_pass  /_provider/v1/models;
            modelcache_scope $http_x_profile;
        }

        location ~ ^/v1/models/(?<model_id>.+)$ {
            modelcache        models;
            modelcache_pass   /_provider/v1/models;
            modelcache_scope  $http_x_profile;
            modelcache_lookup $model_id;
        }

        location ~ ^/(?<p>openrouter|ollama|gemini|unicode)/models/(?<id>.+)$ {
            modelcache        models;
            modelcache_pass   /_provider/$p;
            modelcache_lookup $id;
        }
    }
EOF
$t->run;

$t->mock_route({ path => "/$_->[0]", fixture => $_->[1] }) for
    ['openrouter', 'openrouter_models.json'], ['ollama', 'ollama_tags.json'],
    ['gemini', 'gemini_models_page1.json'], ['unicode', 'adv_unicode_ids.json'];

my $json = JSON::PP->new->utf8;
my %auth = (Authorization => 'Bearer key-a');

# the independent expectation: the first object with that id, or name
sub model_in {
    my ($fixture, $id) = @_;
    my $list = $json->decode($t->fixture($fixture));
    for my $m (@{ $list->{data} // $list->{models} }) {
        return $m if ($m->{id} // $m->{name}) eq $id;
    }
    return undef;
}

sub lookup_ok {
    my ($path, $fixture, $id, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $r = $t->get($path, %auth);
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    is_deeply(MCTest::json_decode($r->{content}), model_in($fixture, $id),
              "$name: the model object");
    return $r;
}

# a list and its lookups share one entry, one fetch

my $list = $t->get('/v1/models', %auth);
is($list->{headers}{'x-modelcache-status'}, 'MISS', 'list: MISS');

my $r = lookup_ok('/v1/models/gpt-4o', 'openai_models.json', 'gpt-4o',
                  'lookup gpt-4o');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'lookup: HIT on the list\'s entry');
like($r->{headers}{etag}, qr/^"[0-9a-f]{32}"$/, 'lookup: an ETag');
isnt($r->{headers}{etag}, $list->{headers}{etag}, 'of its own');
is($t->get('/v1/models/gpt-4o', %auth, 'If-None-Match' => $r->{headers}{etag})
       ->{status}, 304, 'lookup: If-None-Match gives 304');
my $h = $t->head('/v1/models/gpt-4o', %auth);
is($h->{status}, 200, 'lookup HEAD: 200');
is($h->{content}, '', 'lookup HEAD: no body');

my $ft = 'ft:gpt-4o-mini-2024-07-18:acme-research::B7kLmN2q';
lookup_ok("/v1/models/$ft", 'openai_models.json', $ft, 'an id with colons');

is($t->mock_count('/v1/models'), 1, 'a list and lookups: one fetch');

# a lookup first: it fetches the list, which the list location then hits

$r = $t->get('/v1/models/gpt-4o', %auth, 'X-Profile' => 'p2');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'cold lookup: MISS');
is($t->get('/v1/models', %auth, 'X-Profile' => 'p2')
       ->{headers}{'x-modelcache-status'}, 'HIT', 'then the list: HIT');
is($t->mock_count('/v1/models'), 2, 'one fetch for that scope');

# credentials and scope keep apart, for lookups too

$r = $t->get('/v1/models/gpt-4o', Authorization => 'Bearer key-b');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'another key: its own entry');
is($r->{status}, model_in('openai_models_profile_b.json', 'gpt-4o') ? 200 : 404,
   'answered from that key\'s own list');

# ids with '/', encoded or not

lookup_ok('/openrouter/models/anthropic/claude-opus-4.6',
          'openrouter_models.json', 'anthropic/claude-opus-4.6',
          'an id with a slash');
lookup_ok('/openrouter/models/anthropic%2Fclaude-opus-4.6',
          'openrouter_models.json', 'anthropic/claude-opus-4.6',
          'an id with %2F');
is($t->mock_count('/openrouter'), 1, 'openrouter: one fetch');

# Ollama and Gemini: "name"

lookup_ok('/ollama/models/qwen3:8b', 'ollama_tags.json', 'qwen3:8b',
          'an Ollama name');
lookup_ok('/ollama/models/myorg/support-assistant:v3', 'ollama_tags.json',
          'myorg/support-assistant:v3', 'an Ollama name with / and :');
lookup_ok('/gemini/models/models/gemini-2.5-flash',
          'gemini_models_page1.json', 'models/gemini-2.5-flash',
          'a Gemini name');

# hostile ids

lookup_ok('/unicode/models/percent%252Fencoded', 'adv_unicode_ids.json',
          'percent%2Fencoded', 'an id holding "%2F" itself');
lookup_ok('/unicode/models/%E6%A8%A1%E5%9E%8B-%E4%B8%AD%E6%96%87-32k',
          'adv_unicode_ids.json', "\x{6a21}\x{578b}-\x{4e2d}\x{6587}-32k",
          'a CJK id');
lookup_ok('/unicode/models/ns/with/three/slashes', 'adv_unicode_ids.json',
          'ns/with/three/slashes', 'an id with three slashes');

# unknown: OpenAI's 404

$r = $t->get('/v1/models/no-such-model', %auth);
is($r->{status}, 404, 'unknown id: 404');
is($r->{headers}{'content-type'}, 'application/json', 'unknown id: JSON');
my $e = MCTest::json_decode($r->{content});
is($e->{error}{code}, 'model_not_found', 'code model_not_found');
is($e->{error}{type}, 'invalid_request_error', 'type invalid_request_error');
is($e->{error}{param}, 'model', 'param model');
like($e->{error}{message}, qr/'no-such-model' does not exist/, 'message');

$r = $t->get('/v1/models/a"b%5Cc', %auth);
is($r->{status}, 404, 'an id with quotes: 404');
is(MCTest::json_decode($r->{content})->{error}{message} =~ /'a"b\\c'/ ? 1 : 0,
   1, 'its message is valid JSON naming it');

is($t->mock_count('/v1/models'), 3, 'no lookup cost another fetch');

# nginx -t: a lookup needs the cache

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:8m;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /a { modelcache_lookup $uri; }
    }
EOF
my ($code, $out) = $t->nginx_test;
isnt($code, 0, 'modelcache_lookup without modelcache: refused');
like($out, qr/"modelcache_lookup" in location "\/a" is set without "modelcache"/,
     'with a message naming it');

$t->done_testing;
