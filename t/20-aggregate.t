#!/usr/bin/perl

# Aggregation: several "modelcache_pass URI provider=LABEL" in one location.
# Each provider is its own entry (shared with single-provider locations over
# the same pass URI), fetched in parallel on a miss; the answer is one list
# in directive order, each object led by "provider":"LABEL", the first of
# duplicate identities kept; failed providers are left out and named in
# X-Modelcache-Partial (or served stale); lookups, filters and hide/show
# over the merged list; nginx -t refusals. The expected bytes are built from
# the fixtures (t/lib/MCModels.pm), independently of the module.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use List::Util qw(max min);
use MCTest;
use MCModels qw(load_list pct_encode filter_args expect_filter
                expect_members envelope_text hide_show);
use Test::More;
use Time::HiRes qw(time sleep);

my $t = MCTest->new;
$t->mock_start;

my $PASSES = <<'EOF';
            modelcache_pass /_provider/v1/models provider=openai;
            modelcache_pass /_provider/anthropic/v1/models provider=anthropic;
            modelcache_pass /_provider/api/tags provider=ollama;
EOF
my $DUP_PASSES = <<'EOF';
            modelcache_pass /_provider/dup/a provider=alpha;
            modelcache_pass /_provider/dup/b provider=beta;
            modelcache_pass /_provider/dup/c provider=gamma;
EOF

$t->write_conf(<<"EOF");
    modelcache_zone zone=models:32m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        modelcache_scope \$http_x_profile;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_read_timeout 1s;
        }

        location = /v1/models {
            modelcache models;
$PASSES
            modelcache_filter on;
        }

        location ~ ^/v1/models/(?<model_id>.+)\$ {
            modelcache models;
$PASSES
            modelcache_lookup \$model_id;
        }

        # the same pass URIs, one provider each: the same entries
        location = /single/openai {
            modelcache      models;
            modelcache_pass /_provider/v1/models;
        }
        location = /single/anthropic {
            modelcache      models;
            modelcache_pass /_provider/anthropic/v1/models;
        }
        location = /single/ollama {
            modelcache      models;
            modelcache_pass /_provider/api/tags;
        }
        location = /labelled/ollama {
            modelcache      models;
            modelcache_pass /_provider/api/tags provider=ollama;
        }

        location = /stale/v1/models {
            modelcache models;
$PASSES
            modelcache_ttl                    1s;
            modelcache_stale_while_revalidate 0;
            modelcache_stale_if_error         60s;
        }

        location = /hidden/v1/models {
            modelcache models;
$PASSES
            modelcache_hide ^claude-3;
            modelcache_hide ~*QWEN;
        }
        location ~ ^/hidden/v1/models/(?<hidden_id>.+)\$ {
            modelcache models;
$PASSES
            modelcache_hide   ^claude-3;
            modelcache_hide   ~*QWEN;
            modelcache_lookup \$hidden_id;
        }

        location = /shown/v1/models {
            modelcache models;
$PASSES
            modelcache_show ^gpt-4o;
            modelcache_show ~*:LATEST\$;
            modelcache_hide -mini;
        }

        # overlapping lists: duplicates across and within providers
        location = /dup/v1/models {
            modelcache models;
$DUP_PASSES
        }
        location ~ ^/dup/v1/models/(?<dup_id>.+)\$ {
            modelcache models;
$DUP_PASSES
            modelcache_lookup \$dup_id;
        }

        location = /own/v1/models {
            modelcache      models;
            modelcache_pass /_provider/own provider=delta;
            modelcache_pass /_provider/own2 provider=epsilon;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF
$t->run;

# ---- the independent expectation (t/lib/MCModels.pm) ----------------------

# [label, fixture body], ... -> the merged list: each provider's models in
# directive order, the first of equal identities kept; raw: the object's
# bytes with "provider":"LABEL" first, provider_raw: as the provider sent them
sub merge_expect {
    my (@providers) = @_;
    my (%seen, @out);
    for my $p (@providers) {
        my ($label, $text) = @$p;
        for my $m (@{ load_list($text)->{models} }) {
            next if defined $m->{ident} && $seen{ $m->{ident} }++;
            my $rest = substr($m->{raw}, 1);
            my $sep = $rest =~ /^\s*\}/ ? '' : ',';
            push @out, { %$m, label => $label, provider_raw => $m->{raw},
                         raw => qq({"provider":"$label"$sep$rest) };
        }
    }
    return \@out;
}

# the merged answer's envelope
my $MERGED = load_list('{"object":"list","data":[]}');

# the bytes of a merged answer: $want, its models, or a filter's expectation
# (its page, with has_more/first_id/last_id when it reports one)
sub list_body {
    my ($want) = @_;
    my $e = ref $want eq 'ARRAY' ? { page => $want } : $want;
    return envelope_text(expect_members($MERGED, $e));
}

# the model objects' bytes in a list body
sub raw_models {
    my ($text) = @_;
    return [ map { $_->{raw} } @{ load_list($text)->{models} } ];
}

sub labels_of {
    my ($models) = @_;
    my %l = map { $_->{label} => 1 } @$models;
    return join ',', sort keys %l;
}

my %FIX = map { $_ => $t->fixture($_) } qw(openai_models.json
    openai_models_profile_b.json anthropic_models_all.json ollama_tags.json
    adv_duplicate_ids.json);

my @PROVIDERS = (
    [openai    => '/v1/models',           'openai_models.json'],
    [anthropic => '/anthropic/v1/models', 'anthropic_models_all.json'],
    [ollama    => '/api/tags',            'ollama_tags.json'],
);
my @PATHS = map { $_->[1] } @PROVIDERS;
my %PATH_OF = map { $_->[0] => $_->[1] } @PROVIDERS;

# the main location's merged list, without the providers named in @left_out
sub main_expect {
    my (%opt) = @_;
    my %out = map { $_ => 1 } @{ $opt{left_out} // [] };
    return merge_expect(map { [ $_->[0], $FIX{ $_->[0] eq 'openai'
                                    ? $opt{openai} // $_->[2] : $_->[2] } ] }
                        grep { !$out{ $_->[0] } } @PROVIDERS);
}

my $MAIN = main_expect();
my %MAIN_BY_ID = map { $_->{ident} => $_ } @$MAIN;

my $DUP = merge_expect([alpha => $FIX{'adv_duplicate_ids.json'}],
                       [beta  => $FIX{'openai_models_profile_b.json'}],
                       [gamma => $FIX{'openai_models.json'}]);

# ---- helpers ---------------------------------------------------------------

my $OWN_BODY = '{"data":[{"id":"m1","provider":"evil","x":1},'
             . '{"provider":"evil2","id":"m2"}]}';
my $OWN2_BODY = '{"data":[{"id":"m3","x":{"provider":"nested"},"provider":null}]}';

# counters and log zeroed, default routes plus the ones this file adds
sub fresh {
    $t->mock_reset;
    $t->mock_route({ path => '/dup/a', fixture => 'adv_duplicate_ids.json' });
    $t->mock_route({ path => '/dup/b', fixture => 'openai_models_profile_b.json' });
    $t->mock_route({ path => '/dup/c', fixture => 'openai_models.json' });
    $t->mock_route({ path => '/own', body => $OWN_BODY });
    $t->mock_route({ path => '/own2', body => $OWN2_BODY });
}

sub fetches {
    my $s = $t->mock_stats;
    return [ map { $s->{by_path}{$_} // 0 } @PATHS ];
}

sub get_as {
    my ($key, $path, %headers) = @_;
    return $t->get($path, Authorization => "Bearer $key", %headers);
}

sub stats { MCTest::json_decode($t->get('/stats')->{content}) // {} }

sub bytes_is {
    my ($got, $want, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $got //= '';
    return 1 if ok($got eq $want, $name);
    my $i = 0;
    $i++ while $i < length($got) && $i < length($want)
               && substr($got, $i, 1) eq substr($want, $i, 1);
    my $from = max(0, $i - 60);
    diag(sprintf "got %d bytes, want %d; first difference at byte %d\n"
         . "got:  ...%s...\nwant: ...%s...", length $got, length $want, $i,
         substr($got, $from, 160), substr($want, $from, 160));
    return 0;
}

# $want: the models of the answer, or a filter's expectation
sub list_ok {
    my ($r, $want, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    bytes_is($r->{content}, list_body($want), "$name: the expected bytes");
}

sub no_partial {
    my ($r, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    ok(!exists $r->{headers}{'x-modelcache-partial'}, "$name: no X-Modelcache-Partial")
        or diag("X-Modelcache-Partial: $r->{headers}{'x-modelcache-partial'}");
}

sub error_ok {
    my ($r, $status, $param, $code, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, $status, "$name: $status");
    my $e = MCTest::json_decode($r->{content}) // {};
    is_deeply([ @{ $e->{error} // {} }{qw(type param code)} ],
              ['invalid_request_error', $param, $code],
              "$name: invalid_request_error, param $param, $code");
}

# the expectation itself: what this file relies on in the fixtures
cmp_ok(scalar @$MAIN, '==', 114 + 12 + 18, 'expectation: 144 models, no overlap');
is(scalar(grep { $_->{label} eq 'alpha' } @$DUP), 3,
   'expectation: adv_duplicate_ids keeps 3 of its 7 (o\u0033 is o3)');
is(scalar @$DUP, 3 + (27 - 2) + (114 - 26 - 1),
   'expectation: overlapping providers lose their later copies');

# ---- a cold merged request: one fetch per provider; then HITs ---------------

fresh();
my $s0 = stats();
my $r = get_as('key-a', '/v1/models');
list_ok($r, $MAIN, 'cold merged');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'cold merged: MISS');
no_partial($r, 'cold merged');
is_deeply(fetches(), [1, 1, 1], 'cold merged: one fetch per provider');
is($t->mock_total, 3, 'cold merged: nothing else reached the provider');
my $s1 = stats();
is(($s1->{upstream_fetches} // 0) - ($s0->{upstream_fetches} // 0), 3,
   'stats: three upstream fetches');
is(($s1->{misses} // 0) - ($s0->{misses} // 0), 3, 'stats: three misses');

my @got = eval { @{ raw_models($r->{content}) } };
is(scalar @got, scalar @$MAIN, 'cold merged: as many objects as expected');
is(scalar(grep {
       my $pre = qq({"provider":"$MAIN->[$_]{label}",);
       defined $got[$_] && substr($got[$_], 0, length $pre) eq $pre
   } 0 .. $#$MAIN), scalar @$MAIN,
   'every object begins with {"provider":"LABEL", in directive order');
is(scalar(grep {
       my $pre = qq({"provider":"$MAIN->[$_]{label}",);
       defined $got[$_]
           && substr($got[$_], length $pre) eq substr($MAIN->[$_]{provider_raw}, 1)
   } 0 .. $#$MAIN), scalar @$MAIN,
   'every object\'s other bytes are the fixture\'s, verbatim');
is(join(',', map { (MCTest::json_decode($got[$_] // 'null') // {})->{provider} // '?' }
            0, 114, 126),
   'openai,anthropic,ollama', 'the providers\' lists in directive order');

like($r->{headers}{'cache-control'} // '', qr/^private, max-age=(?:59|60)$/,
     'cold merged: Cache-Control');
like($r->{headers}{age} // '', qr/^0$/, 'cold merged: Age 0');
like($r->{headers}{etag} // '', qr/^"[^"]+"$/, 'cold merged: a strong ETag');

my $r2 = get_as('key-a', '/v1/models');
is($r2->{headers}{'x-modelcache-status'}, 'HIT', 'second merged: HIT');
bytes_is($r2->{content}, $r->{content}, 'second merged: the same bytes');
no_partial($r2, 'second merged');
like($r2->{headers}{age} // '', qr/^\d+$/, 'second merged: Age');
like($r2->{headers}{'cache-control'} // '', qr/^private, max-age=\d+$/,
     'second merged: Cache-Control');
is((stats()->{hits} // 0) - ($s1->{hits} // 0), 3,
   'stats: a merged HIT counts one hit per provider');
is($r2->{headers}{etag}, $r->{headers}{etag}, 'second merged: the same ETag');
is(get_as('key-a', '/v1/models', 'If-None-Match' => $r->{headers}{etag} // '-')
       ->{status}, 304, 'merged: If-None-Match gives 304');
is_deeply(fetches(), [1, 1, 1], 'HITs: no new fetch');

# ---- the same pass URIs in single-provider locations: the same entries ------

for my $p (@PROVIDERS) {
    my ($label, $path, $fixture) = @$p;
    $r = get_as('key-a', "/single/$label");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "/single/$label: HIT");
    bytes_is($r->{content}, $FIX{$fixture},
             "/single/$label: the provider's bytes, as a plain list");
}
$r = get_as('key-a', '/labelled/ollama');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'one labelled pass: HIT');
list_ok($r, merge_expect([ollama => $FIX{'ollama_tags.json'}]),
        'one labelled pass: the merged shape');
is_deeply(fetches(), [1, 1, 1], 'single-provider locations: no new fetch');

# ---- lookups over the merged list -----------------------------------------

sub lookup_ok {
    my ($key, $path, $want, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $r = get_as($key, $path);
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    bytes_is($r->{content}, $want->{raw} // '(none)',
             "$name: the object with its provider ($want->{label})");
    return $r;
}

my $claude = 'claude-opus-4-6';
$r = lookup_ok('key-a', "/v1/models/$claude", $MAIN_BY_ID{$claude},
               'lookup, second provider');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'lookup: HIT on the entries');
like($r->{headers}{etag} // '', qr/^"[^"]+"$/, 'lookup: an ETag');
lookup_ok('key-a', '/v1/models/qwen3:8b', $MAIN_BY_ID{'qwen3:8b'},
          'lookup, an Ollama name');
lookup_ok('key-a', '/v1/models/myorg/support-assistant:v3',
          $MAIN_BY_ID{'myorg/support-assistant:v3'},
          'lookup, an Ollama name with / and :');
lookup_ok('key-a', '/v1/models/gpt-4o', $MAIN_BY_ID{'gpt-4o'},
          'lookup, first provider');

$r = get_as('key-a', '/v1/models/no-such-model');
is($r->{status}, 404, 'lookup, unknown: 404');
is($r->{content} =~ s/\n\z//r, '{"error":{"message":"The model \'no-such-model\' does not '
   . 'exist or you do not have access to it.","type":"invalid_request_error",'
   . '"param":"model","code":"model_not_found"}}', 'lookup, unknown: OpenAI\'s error');
is_deeply(fetches(), [1, 1, 1], 'lookups: no new fetch');

# ---- filters over the merged list -----------------------------------------

# the filter expectation over the merged list
sub filtered {
    my ($args) = @_;
    my $e = expect_filter($MAIN, filter_args($args));
    die "test bug: ?$args is not a list\n" unless $e->{status} == 200;
    return $e;
}

# the answer to ?$args: the expected models; returns them
sub filter_ok {
    my ($args, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $e = filtered($args);
    list_ok(get_as('key-a', "/v1/models?$args"), $e, "?$args ($name)");
    return $e->{page};
}

my $q41 = filtered('q=4-1')->{page};
is(labels_of($q41), 'anthropic,openai',
   'expectation: q=4-1 matches two providers');
filter_ok('q=4-1', 'substring over two providers');
my $qllama = filtered('q=LLAMA')->{page};
cmp_ok(scalar(grep { $_->{ident} =~ /Llama/ } @$qllama), '>=', 1,
       'expectation: q=LLAMA matches mixed-case ids');
filter_ok('q=LLAMA', 'ASCII case-insensitive');

my $sorted = filter_ok('sort=id', 'the whole list by id');
filter_ok('sort=-id&q=4-1', 'q, then by id descending');
filter_ok('sort=created', 'created, created_at and modified_at on one time line');

my $page1 = filter_ok('sort=id&limit=5', 'first page');
filter_ok('sort=id&limit=5&after=' . pct_encode($page1->[-1]{ident}), 'second page');
filter_ok('sort=id&limit=5&after=' . pct_encode($sorted->[-3]{ident}), 'last page');
filter_ok('limit=3', 'limit, merged order');
filter_ok('after=' . pct_encode($claude),
          'after an id of the second provider, across into the third');

error_ok(get_as('key-a', '/v1/models?q=no-such-thing'), 404, 'q',
         'model_not_found', 'q matching nothing');
error_ok(get_as('key-a', '/v1/models?after=no-such-model'), 404, 'after',
         'model_not_found', 'after an unknown id');
is_deeply(fetches(), [1, 1, 1], 'filters: no new fetch');

my $total = $t->mock_total;
error_ok(get_as('bad-filter', '/v1/models?limit=0'), 400, 'limit',
         'invalid_filter', 'limit=0, cold key');
error_ok(get_as('bad-filter', '/v1/models?sort=name'), 400, 'sort',
         'invalid_filter', 'sort=name, cold key');
is($t->mock_total, $total, 'a bad filter never reaches any provider');

# ---- hide / show over the merged list -------------------------------------

$r = get_as('key-a', '/hidden/v1/models');
# the location's rules: modelcache_hide ^claude-3; modelcache_hide ~*QWEN;
my $hidden = [ hide_show($MAIN, [], [qr/^claude-3/, qr/QWEN/i]) ];
cmp_ok(scalar @$hidden, '<', scalar(@$MAIN) - 3, 'expectation: hide drops models');
list_ok($r, $hidden, 'hide over the merged list');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'hide: on the same entries');
is(get_as('key-a', '/hidden/v1/models/claude-3-haiku-20240307')->{status}, 404,
   'lookup of a hidden id: 404');
is(get_as('key-a', '/hidden/v1/models/qwen2.5-coder:7b')->{status}, 404,
   'lookup of a ~* hidden Ollama name: 404');
lookup_ok('key-a', '/hidden/v1/models/claude-sonnet-4-6',
          $MAIN_BY_ID{'claude-sonnet-4-6'}, 'lookup of a kept id, with hide');

$r = get_as('key-a', '/shown/v1/models');
# modelcache_show ^gpt-4o; modelcache_show ~*:LATEST$; modelcache_hide -mini;
my $shown = [ hide_show($MAIN, [qr/^gpt-4o/, qr/:LATEST$/i], [qr/-mini/]) ];
is(labels_of($shown), 'ollama,openai',
   'expectation: show keeps two providers\' models');
list_ok($r, $shown, 'show, then hide, over the merged list');
is_deeply(fetches(), [1, 1, 1], 'hide and show: no new fetch');

# ---- duplicates across and within providers -------------------------------

fresh();
$r = get_as('dup', '/dup/v1/models');
list_ok($r, $DUP, 'overlapping providers');
my $d = MCTest::json_decode($r->{content}) // {};
my @gpt4o = grep { ($_->{id} // '') eq 'gpt-4o' } @{ $d->{data} // [] };
is_deeply([ map { [ @$_{qw(provider owned_by created)} ] } @gpt4o ],
          [[ 'alpha', 'system', 1715367049 ]], 'gpt-4o: once, the first copy');
is(scalar(grep { ($_->{id} // '') eq 'o3' } @{ $d->{data} // [] }), 1,
   'o3 and o\u0033: one model');
is_deeply([ @{ $t->mock_stats->{by_path} }{qw(/dup/a /dup/b /dup/c)} ], [1, 1, 1],
          'overlapping providers: one fetch each');

my %DUP_BY_ID;
$DUP_BY_ID{ $_->{ident} } //= $_ for @$DUP;
my %in_c = map { ($_->{ident} // '') => 1 }
    @{ load_list($FIX{'openai_models.json'})->{models} };
my ($in_b_and_c) = grep { $_->{label} eq 'beta' && $in_c{ $_->{ident} } } @$DUP;

lookup_ok('dup', '/dup/v1/models/gpt-4o', $DUP_BY_ID{'gpt-4o'},
          'lookup of a duplicate within and across providers');
like(get_as('dup', '/dup/v1/models/gpt-4o')->{content},
     qr/^\{"provider":"alpha",\s*"id":\s*"gpt-4o",\s*"object":\s*"model",\s*
        "created":\s*1715367049,\s*"owned_by":\s*"system"\s*\}$/x,
     'lookup gpt-4o: the first copy of the first provider');
lookup_ok('dup', '/dup/v1/models/o3', $DUP_BY_ID{o3}, 'lookup o3 (before o\u0033)');
ok(defined $in_b_and_c, 'expectation: an id in beta and gamma');
lookup_ok('dup', "/dup/v1/models/$in_b_and_c->{ident}", $in_b_and_c,
          'lookup of an id in two providers: the first one\'s');
is(get_as('dup', "/dup/v1/models/$in_b_and_c->{ident}")->{content} =~ /"provider":"beta"/
   ? 'beta' : 'other', 'beta', 'that object names the first provider');
lookup_ok('dup', '/dup/v1/models/ft:gpt-4o-mini-2024-07-18:globex-labs::D4pQr7sT',
          $DUP_BY_ID{'ft:gpt-4o-mini-2024-07-18:globex-labs::D4pQr7sT'},
          'lookup of an id only the second provider has');
is_deeply([ @{ $t->mock_stats->{by_path} }{qw(/dup/a /dup/b /dup/c)} ], [1, 1, 1],
          'dup lookups: no new fetch');

# a provider's own "provider" member gives way to the label

$r = get_as('own', '/own/v1/models');
is($r->{status}, 200, 'own provider member: 200');
is_deeply(MCTest::json_decode($r->{content}),
          { object => 'list', data => [ { provider => 'delta', id => 'm1', x => 1 },
                                        { provider => 'delta', id => 'm2' },
                                        { provider => 'epsilon', id => 'm3',
                                          x => { provider => 'nested' } } ] },
          'own provider member: replaced by the label, nested ones kept');
my @own = eval { @{ raw_models($r->{content}) } };
is(scalar(grep { /^\{"provider":"delta",/ && (() = /"provider"/g) == 1 } @own), 2,
   'own provider member: "provider" once per object, first');
like($own[2] // '', qr/^\{"provider":"epsilon",/, 'and the second provider\'s label');
is((() = ($own[2] // '') =~ /"provider"/g), 2,
   'its own top-level "provider" removed, the nested one kept');

# ---- scope and credentials: separate merged answers -----------------------

fresh();
$r = get_as('key-b', '/v1/models');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'key-b: its own entries');
list_ok($r, main_expect(openai => 'openai_models_profile_b.json'),
        'key-b: the openai part from its own list');
is_deeply(fetches(), [1, 1, 1], 'key-b: one fetch per provider');
is($t->mock_stats->{by_auth}{'Bearer key-b'}, 3,
   'key-b: every provider saw the caller\'s credentials');
$r = get_as('key-a', '/v1/models');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'key-a: still its own entries');
list_ok($r, $MAIN, 'key-a: its own merged list');
is(get_as('key-b', '/v1/models/ft:gpt-4o-mini-2024-07-18:globex-labs::D4pQr7sT')
       ->{status}, 200, 'key-b: lookup of its own fine-tune');
is(get_as('key-a', '/v1/models/ft:gpt-4o-mini-2024-07-18:globex-labs::D4pQr7sT')
       ->{status}, 404, 'key-a: not in its list');
$r = get_as('key-a', '/v1/models', 'X-Profile' => 'p2');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'another scope: its own entries');
is_deeply(fetches(), [2, 2, 2], 'another scope: one fetch per provider');

# ---- Age and max-age: the oldest provider, the soonest expiry -------------

fresh();
$r = get_as('age', '/single/openai');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'age: openai alone first');
sleep 2.2;
$r = get_as('age', '/v1/models');
list_ok($r, $MAIN, 'age: merged');
is($r->{headers}{'x-modelcache-status'}, 'MISS',
   'openai HIT, anthropic MISS: the first non-HIT status');
is_deeply(fetches(), [1, 1, 1], 'age: openai fetched once for both locations');
cmp_ok($r->{headers}{age} // -1, '>=', 2, 'Age: the oldest provider\'s');
my ($max_age) = ($r->{headers}{'cache-control'} // '') =~ /^private, max-age=(\d+)$/;
ok(defined $max_age && $max_age <= 58, 'max-age: the soonest expiry (openai\'s)')
    or diag("Cache-Control: " . ($r->{headers}{'cache-control'} // 'none'));

# ---- fetched in parallel --------------------------------------------------

fresh();
$t->mock_route({ path => $_->[1], fixture => $_->[2], delay_ms => 600 })
    for @PROVIDERS;
$r = get_as('par', '/v1/models');
list_ok($r, $MAIN, 'slow providers');
my $st = $t->mock_stats;
my @log = grep { my $p = $_->{path}; grep { $_ eq $p } @PATHS } @{ $st->{requests} };
is(scalar @log, 3, 'slow providers: three requests');
is(scalar(grep { defined $_->{t_start} && defined $_->{t_end} } @log), 3,
   'each with its start and end time');
my $last_start = max(map { $_->{t_start} // 9e9 } @log) // 9e9;
my $first_end = min(map { $_->{t_end} // 0 } @log) // 0;
cmp_ok($last_start, '<', $first_end,
       'all three started before any ended: fetched in parallel')
    or diag(explain(\@log));
cmp_ok($st->{max_in_flight}, '>=', 3, 'the provider saw three in flight at once');

# ---- failing providers: partial answers -----------------------------------

my @FAIL = (
    ['status 500', anthropic => { status => 500, body => 'oops' }],
    ['reset',      openai    => { mode => 'reset' }],
    ['timeout',    ollama    => { mode => 'hang' }],
    ['garbage',    anthropic => { mode => 'garbage' }],
);

my $n = 0;
for my $f (@FAIL) {
    my ($what, $label, $route) = @$f;
    my $key = 'fail' . $n++;
    fresh();
    $t->mock_route({ path => $PATH_OF{$label}, times => 1, %$route });
    $r = get_as($key, '/v1/models');
    list_ok($r, main_expect(left_out => [$label]), "$label $what: the others' models");
    is($r->{headers}{'x-modelcache-partial'}, $label,
       "$label $what: X-Modelcache-Partial: $label");
    is_deeply(fetches(), [1, 1, 1], "$label $what: one fetch per provider");

    $r = get_as($key, '/v1/models');
    list_ok($r, $MAIN, "$label $what, next request: all of them");
    no_partial($r, "$label $what, next request");
    is($r->{headers}{'x-modelcache-status'}, 'MISS',
       "$label $what: the failed provider is a MISS, the others HIT");
    is_deeply(fetches(), [ map { $_->[0] eq $label ? 2 : 1 } @PROVIDERS ],
              "$label $what: only the failed provider fetched again");
}

fresh();
$t->mock_route({ path => $PATH_OF{openai}, times => 1, status => 500, body => 'x' });
$t->mock_route({ path => $PATH_OF{ollama}, times => 1, mode => 'reset' });
$r = get_as('fail-two', '/v1/models');
list_ok($r, main_expect(left_out => ['openai', 'ollama']),
        'two failing: the third\'s models');
is($r->{headers}{'x-modelcache-partial'}, 'openai,ollama',
   'two failing: both named, in directive order');
is_deeply(fetches(), [1, 1, 1], 'two failing: one fetch per provider');

# all failing

fresh();
$t->mock_route({ path => $PATH_OF{openai}, times => 1, status => 500,
                 body => 'openai is down', content_type => 'text/plain' });
$t->mock_route({ path => $PATH_OF{anthropic}, times => 1, status => 500,
                 body => '{"type":"error"}' });
$t->mock_route({ path => $PATH_OF{ollama}, times => 1, status => 500,
                 body => 'ollama is down' });
$r = get_as('fail-all-500', '/v1/models');
is($r->{status}, 500, 'all failing with 500: 500');
is($r->{content}, 'openai is down', 'all failing with 500: the first provider\'s body');
is($r->{headers}{'content-type'}, 'text/plain', 'and its content type');
is($r->{headers}{'x-modelcache-status'}, 'ERROR', 'all failing: ERROR');
is_deeply(fetches(), [1, 1, 1], 'all failing: one fetch per provider');
$r = get_as('fail-all-500', '/v1/models');
list_ok($r, $MAIN, 'all failed: nothing stored, the next request fetches');
is_deeply(fetches(), [2, 2, 2], 'all failed: each provider fetched again');

fresh();
$t->mock_route({ path => $PATH_OF{openai}, times => 1, status => 500, body => 'a' });
$t->mock_route({ path => $PATH_OF{anthropic}, times => 1, status => 503, body => 'b' });
$t->mock_route({ path => $PATH_OF{ollama}, times => 1, status => 429, body => 'c' });
$r = get_as('fail-all-mixed', '/v1/models');
is($r->{status}, 502, 'all failing, different statuses: 502');
my $e = MCTest::json_decode($r->{content}) // {};
is($e->{error}{type}, 'modelcache_upstream_error', 'modelcache_upstream_error');
like($e->{error}{message} // '', qr/\bopenai: 500\b/, 'its message names openai: 500');
like($e->{error}{message} // '', qr/\banthropic: 503\b/, 'and anthropic: 503');
like($e->{error}{message} // '', qr/\bollama: 429\b/, 'and ollama: 429');

fresh();
$t->mock_route({ path => $PATH_OF{openai}, times => 1, mode => 'garbage' });
$t->mock_route({ path => $PATH_OF{anthropic}, times => 1, mode => 'reset' });
$t->mock_route({ path => $PATH_OF{ollama}, times => 1, mode => 'reset' });
$r = get_as('fail-all-502', '/v1/models');
is($r->{status}, 502, 'all failing with 502 (garbage, resets): 502');
is((MCTest::json_decode($r->{content}) // {})->{error}{type},
   'modelcache_upstream_error', 'all failing with 502: the JSON error');

# ---- stale-if-error per provider ------------------------------------------

fresh();
$r = get_as('stale', '/stale/v1/models');
list_ok($r, $MAIN, 'stale: first fetch');
sleep 2.2;
$t->mock_route({ path => $PATH_OF{openai}, times => 1, status => 500, body => 'oops' });
$r = get_as('stale', '/stale/v1/models');
list_ok($r, $MAIN, 'stale: a failing provider is served from its stale entry');
no_partial($r, 'stale');
is($r->{headers}{'x-modelcache-status'}, 'STALE',
   'stale: the first non-HIT provider\'s status (openai STALE, not EXPIRED)');
is_deeply(fetches(), [2, 2, 2], 'stale: every expired provider was asked');
cmp_ok($r->{headers}{age} // -1, '>=', 2, 'stale: Age of the stale entry');
is($r->{headers}{'cache-control'}, 'private, max-age=0', 'stale: max-age=0');
$r = get_as('stale', '/stale/v1/models');
list_ok($r, $MAIN, 'stale: the next request');
no_partial($r, 'stale: the next request');
is(fetches()->[0], 3, 'stale: the failed refresh was not stored, openai asked again');

# ---- nginx -t --------------------------------------------------------------

sub conf_with {
    my ($passes) = @_;
    return <<"EOF";
    modelcache_zone zone=models:8m;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
        }
        location = /a {
            modelcache models;
$passes
        }
        location = /b {
            modelcache      models;
            modelcache_pass /_p/v1/models provider=a;
        }
    }
EOF
}

$t->write_conf(conf_with(<<'EOF'));
            modelcache_pass /_p/v1/models provider=a;
            modelcache_pass /_p/api/tags  provider=B-z_0.9;
EOF
my ($code, $out) = $t->nginx_test;
ok($code == 0 && $out =~ /test is successful/, 'nginx -t: two labelled passes accepted')
    or diag("exit $code:\n$out");

for my $bad (
    ['the second pass without provider=',
     "modelcache_pass /_p/v1/models provider=a;\nmodelcache_pass /_p/api/tags;"],
    ['the first pass without provider=',
     "modelcache_pass /_p/v1/models;\nmodelcache_pass /_p/api/tags provider=b;"],
    ['duplicate labels',
     "modelcache_pass /_p/v1/models provider=a;\nmodelcache_pass /_p/api/tags provider=a;"],
    ['label a/b',
     "modelcache_pass /_p/v1/models provider=a/b;\n"
     . "modelcache_pass /_p/api/tags provider=c;"],
    ['label a,b',
     "modelcache_pass /_p/v1/models provider=a;\n"
     . "modelcache_pass /_p/api/tags provider=a,b;"],
) {
    my ($name, $passes) = @$bad;
    $t->write_conf(conf_with($passes));
    ($code, $out) = $t->nginx_test;
    ok($code != 0 && $out =~ /\[emerg\][^\n]*modelcache_pass/,
       "nginx -t refuses $name, naming modelcache_pass") or diag("exit $code:\n$out");
}

$t->done_testing;
