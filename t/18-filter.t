#!/usr/bin/perl

# modelcache_filter: q, owned_by, sort, limit and after, alone and together,
# over every provider shape, compared with an expectation computed here from
# the fixture (spec: /work/spec4.md).  Each model object keeps the provider's
# bytes, the envelope is rebuilt compactly with has_more/first_id/last_id or
# nextPageToken; bad args are a 400 that never reaches the provider; empty
# results a 404; all variants of a list cost one fetch and each is derived
# once (derived_builds, derived_hits); ETag and If-None-Match on a variant.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use MCModels qw(load_list pct_encode filter_args expect_filter
                check_list check_error check_plain);
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=models:64m;
    modelcache_ttl  1h;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        # inherited by the locations below; /off turns it off again
        modelcache_filter on;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location ~ ^/f/(?<name>[^/]+)$ {
            modelcache      models;
            modelcache_pass /_p/fx/$name;
        }

        location = /cold {
            modelcache      models;
            modelcache_pass /_p/cold;
        }

        location = /off {
            modelcache        models;
            modelcache_pass   /_p/fx/openai_models.json;
            modelcache_filter off;
        }

        location = /stats {
            modelcache_stats models;
        }
    }
EOF

my ($code, $out) = $t->nginx_test;
is($code, 0, 'nginx -t accepts modelcache_filter') or diag($out);
$t->run unless $code;

# ============================================================================
# A variant against the expectation (t/lib/MCModels.pm)
# ============================================================================

# one variant: the first answer against the expectation, a second one the same
sub variant {
    my ($path, $L, $qs) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $name = "$path?$qs";
    my $args = filter_args($qs);
    my $r = $t->get("$path?$qs");
    if (!%$args) {
        check_plain($name, $r, $L);
    } else {
        my $e = expect_filter($L->{models}, $args);
        $e->{status} == 200 ? check_list($name, $r, $L, $e) : check_error($name, $r, $e);
    }
    my $again = $t->get("$path?$qs");
    ok($again->{status} == $r->{status} && $again->{content} eq $r->{content},
       "$name: again: the same answer");
    return $r;
}

sub stats {
    my $r = $t->get('/stats');
    return MCTest::json_decode($r->{content}) // {};
}

# ============================================================================
# The lists
# ============================================================================

# creation times: "created" only when an integer, else created_at or
# modified_at with offsets and fractions; identities from "name" when "id" is
# not a string, "\u" escapes, a model without identity; provider members
# around the list to be replaced in place or kept
my $CRAFTED = <<'JSON';
{"first_id":null, "object" : "list",
 "data": [
  { "id" : "a-plus2", "created_at" : "2025-01-01T10:00:00+02:00" },
  {"id":"b\u002dz","created_at":"2025-01-01T09:00:00Z"},
  {"id":"c-minus5","modified_at":"2025-01-01T03:30:00-05:00","owned_by":"x"},
  {"id":"d-frac","created_at":"2025-01-01T08:30:00.999999+00:00"},
  {"id":"e-int","created":1735720200,"created_at":"1999-01-01T00:00:00Z"},
  {"id":"f-none","owned_by":"x"},
  {"id":"g-float","created":1735718400.5},
  {"id":"h-bad","created_at":"yesterday"},
  {"name":"i-name","created":1735700000},
  {"id":7,"name":"j-NUMid","created":1735700001},
  {"object":"model","created":1735700002},
  {"id":"k-str-created","created":"1735700003"},
  {"id":"l-owned-num","owned_by":5,"created":1e3}
 ],
 "extra": {"k": [1, 2.50, "x"]}
}
JSON

# q, owned_by values to try; extra: query strings of their own
my @LISTS = (
    { fixture => 'openai_models.json',
      q => ['gpt-4o', 'GPT-4O-MINI', 'ft%3Agpt', 'no-such-model'],
      owned_by => ['acme-research', 'openai-internal', 'ACME-research'],
      extra => ['q=gpt%2D4o&sort=id', 'q=gpt-4o&owned_by=openai', 'q=gpt-4o&owned_by=nobody',
                'q=no-such-model&owned_by=system', 'owned_by=openai&q=gpt-4o&sort=created',
                'sort=%2Did&limit=5', 'limit=007', 'limit=1&limit=abc', 'sort=-id&sort=bogus',
                'q=&sort=id', 'sort=id&q=', 'foo=bar&q=o1&bar=baz', 'qq=gpt&sort=-created&limit=4',
                'limit=100000&sort=created', 'after=gpt-4o&limit=1', 'q=o3&after=gpt-4o',
                'q=o3&sort=id&after=o3-mini&limit=2', 'owned_by=acme-research&sort=id&limit=1',
                'foo=bar', 'q=', 'limit=', 'sort=&after=', 'q=O1-&sort=-id&after=o1-pro&limit=3'] },
    { fixture => 'anthropic_models_all.json',
      q => ['opus', 'CLAUDE-3', 'sonnet-4-', 'gpt'],
      owned_by => ['anthropic'],
      extra => ['sort=created&limit=12', 'sort=-created&after=claude-opus-4-1-20250805',
                'sort=created&after=claude-opus-4-20250514&limit=1',
                'q=4-5&sort=id&limit=1', 'q=haiku&after=claude-3-haiku-20240307'] },
    { fixture => 'ollama_tags.json',
      q => ['qwen', '%3ALATEST', 'hf.co%2F', 'nothing-like-it'],
      owned_by => ['ollama'],
      extra => ['after=qwen3%3A8b&limit=3', 'after=myorg%2Fsupport-assistant%3Av3',
                'sort=created&limit=2', 'sort=-created&limit=18', 'sort=-created&limit=17',
                'q=gemma3&sort=created', 'q=cloud&sort=-id&limit=1'] },
    { fixture => 'gemini_models_page1.json',
      q => ['flash', 'MODELS%2FGEMINI-2.5', 'embedding', 'claude'],
      owned_by => ['google'],
      extra => ['q=models%2F&limit=50', 'q=models%2F&limit=49', 'limit=5',
                'after=models%2Fgemini-2.5-flash', 'sort=created&limit=3',
                'sort=-created&limit=3', 'q=pro&sort=-id&after=models%2Fgemini-2.5-pro&limit=2'] },
    { fixture => 'openrouter_models.json', big => 1,
      q => ['anthropic%2F', 'FREE', '%3A%20', 'no-such-vendor%2F'],
      owned_by => ['openai'],
      extra => ['q=openai%2F&sort=id', 'sort=-created&limit=5', 'sort=created&limit=5',
                'q=%3Afree&sort=-id&limit=3', 'q=google%2Fgemini&sort=created&limit=4'] },
    { fixture => 'adv_unicode_ids.json',
      q => ['%C3%A9', 'MOD', 'with+plus', '%C3%89'],
      owned_by => ['unicode-lab', 'Unicode-Lab'],
      extra => ['q=with%20', 'q=%2B', 'q=%22', 'q=%5C', 'q=%09', 'q=%25', 'q=%F0%9F',
                'q=%E6%A8%A1', 'q=%E2%80%AE', 'q=%3F&sort=-id', 'q=%23',
                'after=query%3Fx%3D1%26y%3D2', 'after=with+plus&limit=2',
                'after=with%20space&limit=1', 'after=percent%252Fencoded&limit=1',
                'after=%F0%9F%A4%96-escaped-robot', 'after=caf%C3%A9-escaped-bmp',
                'after=%F0%9F%9A%80-rocket-model&sort=id&limit=3',
                'sort=id&limit=5', 'sort=-id&limit=5', 'q=model&sort=id'] },
    { fixture => 'adv_duplicate_ids.json',
      q => ['o3', 'GPT-4O', 'mini', 'o4'],
      owned_by => ['duplicate-second-copy', 'system'],
      extra => ['after=gpt-4o', 'sort=id&after=gpt-4o', 'sort=-id&after=gpt-4o&limit=2',
                'sort=id&after=o3', 'sort=-created&after=gpt-4o&limit=1', 'q=o%33',
                'owned_by=duplicate-after-unescape&limit=1', 'after=o%5Cu0033'] },
    { fixture => 'crafted', body => $CRAFTED, custom => 1,
      extra => ['sort=created', 'sort=-created', 'sort=id', 'sort=-id', 'q=-', 'q=NUM',
                'q=b-z', 'owned_by=x', 'owned_by=5', 'sort=created&after=e-int',
                'sort=created&after=d-frac&limit=2', 'sort=-created&limit=3',
                'sort=-created&after=a-plus2', 'after=j-numid', 'after=b-z&limit=1',
                'after=7', 'q=k-&sort=created', 'sort=created&limit=4'] },
    { fixture => 'adv_empty_list.json', empty => 1,
      q => ['gpt'], owned_by => ['system'],
      extra => ['sort=id', 'sort=-created', 'after=gpt-4o', 'q=x&sort=id'] },
);

# the query strings tried on one list: each arg alone, then combinations
sub query_strings {
    my ($L, $spec) = @_;
    return @{ $spec->{extra} } if $spec->{custom};
    my @qs;
    push @qs, map { "q=$_" } @{ $spec->{q} };
    push @qs, map { "owned_by=$_" } @{ $spec->{owned_by} };
    return (@qs, @{ $spec->{extra} }) if $spec->{empty};

    push @qs, map { "sort=$_" } qw(id -id created -created);
    push @qs, map { "limit=$_" } qw(1 3 100000);
    my @ids = map { $_->{ident} } grep { defined $_->{ident} } @{ $L->{models} };
    push @qs, map { 'after=' . pct_encode($_) } $ids[0], $ids[int($#ids / 2)], $ids[-1];
    push @qs, 'after=no-such-model-id';

    # q x owned_by x sort, each with limit, after (a cursor from the
    # expected page) and both
    my @owned = grep { defined $_->{owned_by} } @{ $L->{models} };
    for my $q (undef, $spec->{q}[0]) {
        for my $o (undef, @owned ? $owned[0]{owned_by} : ()) {
            for my $sort (undef, qw(id -id created -created)) {
                my @base = ((defined $q ? "q=$q" : ()),
                            (defined $o ? 'owned_by=' . pct_encode($o) : ()),
                            (defined $sort ? "sort=$sort" : ()));
                push @qs, join '&', @base, 'limit=2' if @base;
                my $e = expect_filter($L->{models}, filter_args(join '&', @base));
                my @page = $e->{status} == 200 ? @{ $e->{page} } : ();
                next unless @page > 2 && defined $page[1]{ident};
                my $cursor = 'after=' . pct_encode($page[1]{ident});
                push @qs, join '&', @base, $cursor unless $spec->{big} && !defined $q;
                push @qs, join '&', @base, $cursor, 'limit=2';
            }
        }
    }
    my ($q0, $o0) = ($spec->{q}[0], $spec->{owned_by}[0]);
    push @qs, "owned_by=$o0&sort=-created&limit=1", "q=$q0&owned_by=$o0",
              "owned_by=$o0&sort=id&after=no-such-model-id";
    return (@qs, @{ $spec->{extra} });
}

my (%lists, $n_variants);
for my $spec (@LISTS) {
    my $f = $spec->{fixture};
    $t->mock_route({ path => "/fx/$f",
                     $spec->{body} ? (body => $spec->{body}) : (fixture => $f) });
    my $L = $lists{$f} = load_list($spec->{body} // $t->fixture($f));
    my $path = "/f/$f";

    # the plain list first: stored, and served as the provider sent it
    my $r = $t->get($path);
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "$path: MISS");
    check_plain("$path (plain, MISS)", $r, $L);
    check_plain("$path (plain, HIT)", $t->get($path), $L);

    for my $qs (query_strings($L, $spec)) {
        variant($path, $L, $qs);
        $n_variants++;
    }
    is($t->mock_count("/fx/$f"), 1, "$f: every variant from one provider fetch");
}
note("$n_variants variants");

# ---- modelcache_filter off: args are not read ---------------------------------

for my $qs ('q=gpt-4o&limit=1', 'sort=foo') {
    check_plain("/off?$qs", $t->get("/off?$qs"), $lists{'openai_models.json'});
}
is($t->mock_count('/fx/openai_models.json'), 1, '/off shares the list\'s entry');

# ---- bad args: 400 before anything else -----------------------------------------

$t->mock_route({ path => '/cold', fixture => 'openai_models.json' });

my @BAD = (
    ['sort=foo', 'sort'], ['sort=ID', 'sort'], ['sort=%20id', 'sort'], ['sort=id%20', 'sort'],
    ['sort=+id', 'sort'], ['sort=--id', 'sort'], ['sort=created_at', 'sort'],
    ['limit=0', 'limit'], ['limit=-1', 'limit'], ['limit=abc', 'limit'],
    ['limit=100001', 'limit'], ['limit=1.5', 'limit'], ['limit=1e3', 'limit'],
    ['limit=%2B5', 'limit'], ['limit=%205', 'limit'], ['limit=5abc', 'limit'],
    ['limit=00', 'limit'], ['limit=99999999999999999999', 'limit'],
    ['limit=18446744073709551617', 'limit'], ['limit=4294967297', 'limit'],
    ['q=gpt&limit=0', 'limit'], ['sort=foo&limit=3', 'sort'], ['after=x&sort=bogus', 'sort'],
    ['q=no-such-model&limit=-1', 'limit'], ['sort=bogus&sort=id', 'sort'],
    ['limit=abc&limit=1', 'limit'],
);

for my $b (@BAD) {
    my ($qs, $param) = @$b;
    my $e = expect_filter([], filter_args($qs));
    die "test bug: $qs is not a bad request here\n"
        unless $e->{status} == 400 && $e->{error}{param} eq $param;
    check_error("/cold?$qs", $t->get("/cold?$qs"), $e);
}
is($t->mock_count('/cold'), 0, 'bad args: no request reached the provider');
my $r = $t->get('/cold');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'bad args stored nothing: then a MISS');
is($t->mock_count('/cold'), 1, 'one fetch for it');
for my $b (@BAD[0, 7, 9, 10]) {
    my ($qs, $param) = @$b;
    check_error("/cold?$qs (stored list)", $t->get("/cold?$qs"),
                expect_filter([], filter_args($qs)));
}
is($t->mock_count('/cold'), 1, 'bad args on a stored list: no fetch either');

# ---- derived answers are kept in the zone ---------------------------------------

my $v = '/f/openai_models.json?q=gpt-4o&sort=-id&limit=7';
my $s0 = stats();
my $r1 = $t->get($v);
my $s1 = stats();
my $r2 = $t->get($v);
my $s2 = stats();
is($r1->{status}, 200, 'a new variant: 200');
is($r1->{headers}{'x-modelcache-status'}, 'HIT', 'a new variant of a stored list: HIT');
is(($s1->{derived_builds} // -1) - ($s0->{derived_builds} // 0), 1,
   'a new variant: derived_builds + 1');
is(($s1->{derived_hits} // -1) - ($s0->{derived_hits} // 0), 0,
   'a new variant: derived_hits + 0');
is(($s2->{derived_builds} // -1) - ($s1->{derived_builds} // 0), 0,
   'the same variant again: derived_builds + 0');
is(($s2->{derived_hits} // -1) - ($s1->{derived_hits} // 0), 1,
   'the same variant again: derived_hits + 1');
ok($r2->{content} eq $r1->{content}, 'the same variant again: the same bytes');
is($r2->{headers}{etag}, $r1->{headers}{etag}, 'the same variant again: the same ETag');
is(($s2->{hits} // 0) - ($s0->{hits} // 0), 2, 'both counted as hits of the list entry');
is(($s2->{upstream_fetches} // -1) - ($s0->{upstream_fetches} // 0), 0, 'and no fetch');

# ---- ETag, If-None-Match, HEAD on a variant -------------------------------------

my $plain = $t->get('/f/openai_models.json');
my $va = $t->get('/f/openai_models.json?q=gpt-4o&limit=3');
my $vb = $t->get('/f/openai_models.json?q=gpt-4o&limit=4');
my $etag = $va->{headers}{etag} // '';
like($etag, qr/\A"[^"]+"\z/, 'a variant: a strong ETag');
isnt($etag, $plain->{headers}{etag} // '', 'not the list\'s ETag');
isnt($etag, $vb->{headers}{etag} // '', 'not another variant\'s ETag');
$r = $t->get('/f/openai_models.json?q=gpt-4o&limit=3', 'If-None-Match' => $etag);
is($r->{status}, 304, 'If-None-Match with its ETag: 304');
is($r->{content}, '', '304: no body');
$r = $t->get('/f/openai_models.json?q=gpt-4o&limit=4', 'If-None-Match' => $etag);
is($r->{status}, 200, 'another variant with that ETag: 200');
$r = $t->head('/f/openai_models.json?q=gpt-4o&limit=3');
is($r->{status}, 200, 'HEAD of a variant: 200');
is($r->{content}, '', 'HEAD of a variant: no body');
is($r->{headers}{'content-length'}, length $va->{content}, 'HEAD: the GET\'s length');
like($va->{headers}{'cache-control'} // '', qr/\Aprivate, max-age=\d+\z/,
     'a variant: Cache-Control of the entry');
check_plain('the plain list after all variants', $t->get('/f/openai_models.json'),
            $lists{'openai_models.json'});

# ---- all of it: one fetch per list ------------------------------------------------

is_deeply({ map { ("/fx/$_->{fixture}" => $t->mock_count("/fx/$_->{fixture}")) } @LISTS },
          { map { ("/fx/$_->{fixture}" => 1) } @LISTS },
          'one provider fetch per list for the whole test');

$t->done_testing;
