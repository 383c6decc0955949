#!/usr/bin/perl

# Every fixture through a modelcache location: the providers' lists and the
# valid adversarial ones are stored and served byte for byte (one fetch);
# bodies that are not a model list (invalid, truncated, error objects, no
# model array, too deep, numbers out of range) are a 502 JSON error and not
# stored; a list over max_entry is served whole but not stored;
# modelcache_list_field; each format's identity (id, Ollama's and Gemini's
# name) for lookups and q= (spec: /work/spec4.md).

use strict;
use warnings;

use Digest::SHA qw(sha256_hex);
use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use MCModels qw(load_list filter_args expect_filter check_list check_error check_plain);
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    # 64m: the default max_entry (8m) applies
    modelcache_zone zone=models:64m;
    modelcache_ttl  1h;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location ~ ^/f/(?<name>[^/]+)$ {
            modelcache      models;
            modelcache_pass /_p/fx/$name;
        }

        location ~ ^/f/(?<name>[^/]+)/models/(?<id>.+)$ {
            modelcache        models;
            modelcache_pass   /_p/fx/$name;
            modelcache_lookup $id;
        }

        location ~ ^/q/(?<name>[^/]+)$ {
            modelcache        models;
            modelcache_pass   /_p/fx/$name;
            modelcache_filter on;
        }

        # the model array under "items"
        location = /items {
            modelcache            models;
            modelcache_pass       /_p/lf/items;
            modelcache_list_field items;
            modelcache_filter     on;
        }

        location ~ ^/items/models/(?<id>.+)$ {
            modelcache            models;
            modelcache_pass       /_p/lf/items;
            modelcache_list_field items;
            modelcache_lookup     $id;
        }

        # the same body, auto-detected: no model list
        location = /items-auto {
            modelcache      models;
            modelcache_pass /_p/lf/items-auto;
        }

        # Ollama's list has "models", no "data"
        location = /ollama-as-data {
            modelcache            models;
            modelcache_pass       /_p/lf/ollama-data;
            modelcache_list_field data;
        }

        location = /ollama-as-models {
            modelcache            models;
            modelcache_pass       /_p/lf/ollama-models;
            modelcache_list_field models;
            modelcache_filter     on;
        }
    }
EOF

my ($code, $out) = $t->nginx_test;
is($code, 0, 'nginx -t accepts the configuration') or diag($out);
$t->run unless $code;

# ============================================================================
# The fixtures
# ============================================================================

my @PROVIDER = qw(openai_models.json openai_models_profile_b.json
                  anthropic_models_page1.json anthropic_models_page2.json
                  anthropic_models_all.json ollama_tags.json
                  lmstudio_api_v0_models.json lmstudio_v1_models.json
                  openrouter_models.json gemini_models_page1.json
                  gemini_models_page2.json);
my @VALID = qw(adv_empty_list.json adv_duplicate_ids.json adv_unicode_ids.json);
my @NOT_A_LIST = qw(adv_invalid_json.json adv_truncated.json adv_error_object_200.json
                    adv_error_object_200_anthropic.json adv_no_model_array.json
                    adv_data_not_array.json adv_deep_nesting.json
                    adv_numbers_out_of_range.json);
my $LARGE = 'adv_large_12mb.json';

my $dir = $ENV{MODELCACHE_FIXTURES} // $t->repo . '/../shared/fixtures';
opendir(my $dh, $dir) or die "cannot read $dir: $!\n";
my @on_disk = sort grep { /\.json\z/ } readdir $dh;
is_deeply([ sort @PROVIDER, @VALID, @NOT_A_LIST, $LARGE ], \@on_disk,
          'every fixture on disk is tried here');

$t->mock_route({ path => "/fx/$_", fixture => $_ }) for @on_disk;

sub upstream_error {
    my ($name, $r) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 502, "$name: 502");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    is($r->{headers}{'x-modelcache-status'}, 'ERROR', "$name: ERROR");
    my $e = MCTest::json_decode($r->{content});
    my $err = ref $e eq 'HASH' && ref $e->{error} eq 'HASH' ? $e->{error} : {};
    is_deeply([ sort keys %{ ref $e eq 'HASH' ? $e : {} } ], ['error'],
              "$name: {\"error\":{...}}");
    is($err->{type}, 'modelcache_upstream_error', "$name: type modelcache_upstream_error");
    ok(defined $err->{message} && !ref $err->{message} && length $err->{message},
       "$name: a message") or diag($r->{content});
}

# ---- lists: stored, served byte for byte, one fetch ------------------------------

my %L;
for my $f (@PROVIDER, @VALID) {
    $L{$f} = load_list($t->fixture($f));
    my $r = $t->get("/f/$f");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$f: MISS");
    check_plain("$f (MISS)", $r, $L{$f});
    like($r->{headers}{etag} // '', qr/\A"[^"]+"\z/, "$f: an ETag");
    $r = $t->get("/f/$f");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "$f: HIT");
    check_plain("$f (HIT)", $r, $L{$f});
    is($t->mock_count("/fx/$f"), 1, "$f: one fetch");
}

# ---- not a model list: 502, not stored ----------------------------------------------

for my $f (@NOT_A_LIST) {
    upstream_error("$f #1", $t->get("/f/$f"));
    upstream_error("$f #2", $t->get("/f/$f"));
    is($t->mock_count("/fx/$f"), 2, "$f: not stored, fetched again");
}

# ---- over max_entry: served whole, not stored ------------------------------------

my $big_sha = sha256_hex($t->fixture($LARGE));
for my $i (1, 2) {
    my $r = $t->get("/f/$LARGE");
    is($r->{status}, 200, "$LARGE #$i: 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$LARGE #$i: MISS");
    is(length $r->{content}, 12 * 1024 * 1024, "$LARGE #$i: 12 MiB");
    ok(sha256_hex($r->{content}) eq $big_sha, "$LARGE #$i: byte-identical");
}
is($t->mock_count("/fx/$LARGE"), 2, "$LARGE: over max_entry, fetched again");
my $warn = 'provider answer of 12582912 bytes exceeds max_entry=8388608 of zone "models", '
         . 'not stored';
$t->log_like(qr/\[warn\].*\Q$warn\E/, "$LARGE: the [warn] names the size and max_entry");

# ---- identity: lookups by id, by name ---------------------------------------------

sub path_encode {
    my ($s) = @_;
    $s =~ s{([^A-Za-z0-9._~:/-])}{sprintf '%%%02X', ord $1}ge;
    return $s;
}

# the first model with that identity (bytes)
sub first_with {
    my ($L, $ident) = @_;
    my ($m) = grep { defined $_->{ident} && $_->{ident} eq $ident } @{ $L->{models} };
    return $m;
}

sub lookup_ok {
    my ($f, $ident, $path) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $m = first_with($L{$f}, $ident) or die "test bug: no '$ident' in $f\n";
    $path //= "/f/$f/models/" . path_encode($ident);
    my $r = $t->get($path);
    is($r->{status}, 200, "$path: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$path: JSON");
    ok($r->{content} eq $m->{raw}, "$path: the model object's bytes as the provider sent them")
        or diag('got: ' . substr($r->{content}, 0, 300) . "\nwant: " . substr($m->{raw}, 0, 300));
    is_deeply(MCTest::json_decode($r->{content}), $m->{obj},
              "$path: the model (model #$m->{idx})");
    like($r->{headers}{etag} // '', qr/\A"[^"]+"\z/, "$path: a strong ETag");
}

sub lookup_404 {
    my ($path, $id) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $r = $t->get($path);
    is($r->{status}, 404, "$path: 404");
    is($r->{headers}{'content-type'}, 'application/json', "$path: JSON");
    is_deeply(MCTest::json_decode($r->{content}), { error => {
        message => "The model '$id' does not exist or you do not have access to it.",
        type => 'invalid_request_error', param => 'model', code => 'model_not_found' } },
        "$path: OpenAI's model_not_found") or diag($r->{content});
}

# first, middle and last identity of each list
for my $f (@PROVIDER, grep { $_ ne 'adv_empty_list.json' } @VALID) {
    my @ids = grep { length } map { $_->{ident} // '' } @{ $L{$f}{models} };
    my %seen;
    lookup_ok($f, $_) for grep { !$seen{$_}++ } @ids[0, int($#ids / 2), -1];
}

# each format's identity, named
lookup_ok('openai_models.json', 'gpt-4o');
lookup_ok('openai_models.json', 'ft:gpt-4o-mini-2024-07-18:acme-research::B7kLmN2q');
lookup_ok('anthropic_models_all.json', 'claude-opus-4-6');
lookup_ok('ollama_tags.json', 'qwen3:8b');
lookup_ok('ollama_tags.json', 'myorg/support-assistant:v3');
lookup_ok('ollama_tags.json', 'hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M');
lookup_ok('gemini_models_page1.json', 'models/gemini-2.5-flash');
lookup_ok('gemini_models_page2.json', 'models/aqa');
lookup_ok('lmstudio_v1_models.json', 'qwen/qwen3-4b-2507');
lookup_ok('lmstudio_api_v0_models.json', 'text-embedding-nomic-embed-text-v1.5');
lookup_ok('openrouter_models.json', 'anthropic/claude-opus-4.6');
lookup_ok('openrouter_models.json', 'anthropic/claude-opus-4.6',
          '/f/openrouter_models.json/models/anthropic%2Fclaude-opus-4.6');
lookup_ok('adv_duplicate_ids.json', 'gpt-4o');
lookup_ok('adv_duplicate_ids.json', 'o3');
lookup_ok('adv_duplicate_ids.json', 'gpt-4o-mini');
lookup_ok('adv_unicode_ids.json', "\xF0\x9F\xA4\x96-escaped-robot");
lookup_ok('adv_unicode_ids.json', "caf\xC3\xA9-escaped-bmp");

lookup_404('/f/openai_models.json/models/no-such-model', 'no-such-model');
lookup_404('/f/gemini_models_page1.json/models/gemini-2.5-flash', 'gemini-2.5-flash');
lookup_404('/f/ollama_tags.json/models/qwen3', 'qwen3');
lookup_404('/f/openrouter_models.json/models/Anthropic%3A%20Claude%20Opus%204.6',
           'Anthropic: Claude Opus 4.6');
lookup_404('/f/adv_duplicate_ids.json/models/o%5Cu0033', 'o\u0033');
lookup_404('/f/adv_empty_list.json/models/gpt-4o', 'gpt-4o');

is_deeply({ map { ($_ => $t->mock_count("/fx/$_")) } @PROVIDER, @VALID },
          { map { ($_ => 1) } @PROVIDER, @VALID },
          'lookups: answered from the stored lists, no fetch');

# ---- identity: q= on each format ---------------------------------------------------

my %Q = (
    'openai_models.json'           => ['gpt-4o', 'GPT-4O-MINI', 'ft%3A'],
    'openai_models_profile_b.json' => ['gpt'],
    'anthropic_models_page1.json'  => ['opus'],
    'anthropic_models_page2.json'  => ['HAIKU'],
    'anthropic_models_all.json'    => ['sonnet', 'claude-3-'],
    'ollama_tags.json'             => ['qwen3', '%3ALATEST', 'hf.co%2F'],
    'lmstudio_api_v0_models.json'  => ['qwen'],
    'lmstudio_v1_models.json'      => ['embedding', 'QWEN%2F'],
    'openrouter_models.json'       => ['anthropic%2Fclaude', '%3A%20', 'Claude%20Opus'],
    'gemini_models_page1.json'     => ['flash', 'models%2Fgemini-2.5-pro', 'Gemini%202.5'],
    'gemini_models_page2.json'     => ['imagen', 'VEO'],
    'adv_duplicate_ids.json'       => ['o3', 'GPT-4O'],
    'adv_unicode_ids.json'         => ['%E6%A8%A1', '%C3%A9', 'with+plus'],
    'adv_empty_list.json'          => ['gpt'],
);

for my $f (@PROVIDER, @VALID) {
    for my $qs ((map { "q=$_" } @{ $Q{$f} }), 'q=zzz-no-such-model') {
        my $path = "/q/$f?$qs";
        my $e = expect_filter($L{$f}{models}, filter_args($qs));
        my $r = $t->get($path);
        $e->{status} == 200 ? check_list($path, $r, $L{$f}, $e) : check_error($path, $r, $e);
    }
    check_plain("/q/$f (no args)", $t->get("/q/$f"), $L{$f});
}

is_deeply({ map { ($_ => $t->mock_count("/fx/$_")) } @PROVIDER, @VALID },
          { map { ($_ => 1) } @PROVIDER, @VALID },
          'q=: answered from the stored lists, no fetch');

# ---- modelcache_list_field ---------------------------------------------------------

$t->mock_route({ path => '/lf/items', fixture => 'adv_no_model_array.json' });
$t->mock_route({ path => '/lf/items-auto', fixture => 'adv_no_model_array.json' });
$t->mock_route({ path => '/lf/ollama-data', fixture => 'ollama_tags.json' });
$t->mock_route({ path => '/lf/ollama-models', fixture => 'ollama_tags.json' });

my $items = $L{items} = load_list($t->fixture('adv_no_model_array.json'), 'items');
my $r = $t->get('/items');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'list_field items: MISS');
check_plain('list_field items (MISS)', $r, $items);
$r = $t->get('/items');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'list_field items: HIT');
check_plain('list_field items (HIT)', $r, $items);

for my $qs ('q=gpt', 'q=GPT-4O&limit=1', 'sort=-id', 'owned_by=system&sort=created',
            'q=claude', 'after=gpt-4o', 'owned_by=nobody', 'limit=0') {
    my $e = expect_filter($items->{models}, filter_args($qs));
    my $path = "/items?$qs";
    $r = $t->get($path);
    $e->{status} == 200 ? check_list($path, $r, $items, $e) : check_error($path, $r, $e);
}
lookup_ok('items', 'gpt-4o', '/items/models/gpt-4o');
lookup_404('/items/models/gpt-4o-mini', 'gpt-4o-mini');
is($t->mock_count('/lf/items'), 1, 'list_field items: one fetch');

upstream_error('the same body without list_field #1', $t->get('/items-auto'));
upstream_error('the same body without list_field #2', $t->get('/items-auto'));
is($t->mock_count('/lf/items-auto'), 2, 'without list_field: not stored');

upstream_error('Ollama with list_field data #1', $t->get('/ollama-as-data'));
upstream_error('Ollama with list_field data #2', $t->get('/ollama-as-data'));
is($t->mock_count('/lf/ollama-data'), 2, 'Ollama with list_field data: not stored');

my $ollama = $L{'ollama_tags.json'};
$r = $t->get('/ollama-as-models');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'Ollama with list_field models: MISS');
check_plain('Ollama with list_field models', $r, $ollama);
for my $qs ('q=qwen&limit=1', 'q=gemma&sort=-created') {
    my $e = expect_filter($ollama->{models}, filter_args($qs));
    check_list("/ollama-as-models?$qs", $t->get("/ollama-as-models?$qs"), $ollama, $e);
}
is($t->mock_count('/lf/ollama-models'), 1, 'Ollama with list_field models: one fetch');

$t->done_testing;
