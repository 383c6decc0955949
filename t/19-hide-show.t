#!/usr/bin/perl

# modelcache_hide / modelcache_show: operator regexes (~* for caseless) on
# model identities, applied to lists, filters and lookups (a hidden model is
# a 404); several of each together; a level without any inherits the
# enclosing level's (http -> server -> location), a level with its own
# replaces them; changed rules after a reload; models without identity; a bad
# regex fails nginx -t naming the directive; a plain list and hide/show lists
# over one pass cost one fetch (spec: /work/spec4.md).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use MCModels qw(load_list filter_args expect_filter hide_show
                check_list check_error check_plain);
use Test::More;

my $t = MCTest->new;
$t->mock_start;

# ---- a bad regex: nginx -t fails naming the directive ------------------------------

sub line_of {
    my ($text, $re) = @_;
    my @lines = split /\n/, $text;
    for my $i (0 .. $#lines) {
        return $i + 1 if $lines[$i] =~ $re;
    }
    die "line_of: $re not in the config\n";
}

sub refused {
    my ($name, $directive, $line_re, $http) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $text = $t->write_conf($http);
    my ($code, $out) = $t->nginx_test;
    my $where = quotemeta($t->conf_path) . ':' . line_of($text, $line_re);
    isnt($code, 0, "$name: nginx -t fails");
    like($out, qr/\[emerg\] [^\n]*\b$directive\b[^\n]* in $where\n/,
         "$name: the [emerg] names $directive, file and line");
    unlike($out, qr/unknown directive|directive is not allowed here/,
           "$name: the directive itself is known there");
}

refused('modelcache_hide "(" in a location',
        'modelcache_hide', qr/modelcache_hide "\("/, <<'EOF');
    modelcache_zone zone=models:8m;
    server {
        listen 127.0.0.1:%%PORT%%;
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
            modelcache_hide ^gpt;
            modelcache_hide "(";
        }
    }
EOF

refused('modelcache_show "~*[a-" at server level',
        'modelcache_show', qr/modelcache_show "~\*\[a-"/, <<'EOF');
    modelcache_zone zone=models:8m;
    server {
        listen 127.0.0.1:%%PORT%%;
        modelcache_show "~*[a-";
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
    }
EOF

refused('modelcache_hide "a{2,1}" at http level',
        'modelcache_hide', qr/modelcache_hide "a\{2,1\}"/, <<'EOF');
    modelcache_zone zone=models:8m;
    modelcache_hide "a{2,1}";
    server {
        listen 127.0.0.1:%%PORT%%;
        location = /a {
            modelcache      models;
            modelcache_pass /_p/v1/models;
        }
    }
EOF

# ---- the configuration --------------------------------------------------------------

# rules in nginx syntax and the same in Perl, for the expectation
my %RULES = (
    hidden => [
        [hide => '^gpt-3\.5',            qr/^gpt-3\.5/],
        [hide => '~*TTS',                qr/TTS/i],
        [hide => 'GPT-4',                qr/GPT-4/],
        [hide => '"-preview-[0-9]{4}-"', qr/-preview-[0-9]{4}-/],
    ],
    shown => [
        [show => '^gpt-4o',  qr/^gpt-4o/],
        [show => '~*^O3',    qr/^O3/i],
        [hide => 'mini',     qr/mini/],
        [hide => '~*AUDIO',  qr/AUDIO/i],
    ],
    # after the reload
    shown2 => [
        [show => '~*^O1-',   qr/^O1-/i],
        [show => 'codex',    qr/codex/],
        [hide => '2024',     qr/2024/],
    ],
    server_b => [
        [hide => '^dall-e',    qr/^dall-e/],
        [hide => '~*^WHISPER', qr/^WHISPER/i],
    ],
    override => [
        [hide => '^gpt-', qr/^gpt-/],
    ],
    override_show => [
        [show => '~*^O1', qr/^O1/i],
    ],
    http => [
        [hide => '~*^BABBAGE', qr/^BABBAGE/i],
        [hide => '^davinci',   qr/^davinci/],
    ],
    noid_hide     => [[hide => '^b', qr/^b/]],
    noid_show     => [[show => '.',  qr/./]],
    noid_show_any => [[show => '^',  qr/^/]],
    none          => [],
);

sub directives {
    my ($rules, $indent) = @_;
    return join '', map { "$indent    modelcache_$_->[0] $_->[1];\n" } @{ $RULES{$rules} };
}

sub location {
    my ($match, $pass, $rules, @more) = @_;
    return "        location $match {\n"
         . "            modelcache      models;\n"
         . "            modelcache_pass $pass;\n"
         . join('', map { "            $_;\n" } @more)
         . directives($rules, '        ')
         . "        }\n\n";
}

# phase 1: no rules at http level, none in server A but in some of its
# locations, server B (PORT2) has its own; phase 2 (a reload): rules at http
# level, /shown's changed
sub config {
    my ($phase) = @_;
    my $shown = $phase == 1 ? 'shown' : 'shown2';
    my $loc_a = join '',
        location('= /v1/models', '/_p/v1/models', 'none'),
        location('= /hidden', '/_p/v1/models', 'hidden'),
        location('= /hidden-filter', '/_p/v1/models', 'hidden', 'modelcache_filter on'),
        location('~ ^/hidden/models/(?<id>.+)$', '/_p/v1/models', 'hidden',
                 'modelcache_lookup $id'),
        location('= /shown', '/_p/v1/models', $shown),
        location('= /shown-filter', '/_p/v1/models', $shown, 'modelcache_filter on'),
        location('~ ^/shown/models/(?<id>.+)$', '/_p/v1/models', $shown,
                 'modelcache_lookup $id'),
        location('= /noid', '/_p/noid', 'none'),
        location('= /noid-hide', '/_p/noid', 'noid_hide', 'modelcache_filter on'),
        location('= /noid-show', '/_p/noid', 'noid_show'),
        location('= /noid-show-any', '/_p/noid', 'noid_show_any', 'modelcache_filter on');
    my $loc_b = join '',
        location('= /v1/models', '/_p/v1/models', 'none'),
        location('~ ^/v1/models/(?<id>.+)$', '/_p/v1/models', 'none', 'modelcache_lookup $id'),
        location('= /override', '/_p/v1/models', 'override'),
        location('= /override-show', '/_p/v1/models', 'override_show');
    my $http = $phase == 1 ? '' : directives('http', '');
    my $server_b = directives('server_b', '    ');
    return <<"EOF";
    modelcache_zone zone=models:16m;
    modelcache_ttl  1h;
$http
    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /stats {
            modelcache_stats models;
        }

$loc_a    }

    server {
        listen 127.0.0.1:%%PORT2%% reuseport;

$server_b        modelcache_filter on;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

$loc_b    }
EOF
}

$t->write_conf(config(1));
my ($code, $out) = $t->nginx_test;
is($code, 0, 'nginx -t accepts modelcache_hide/show, ~* and {n} in quotes') or diag($out);
$t->run unless $code;

# ============================================================================
# hide/show, on top of the filter expectation
# ============================================================================

# the models of $L that the rules named $rules keep
sub visible {
    my ($L, $rules) = @_;
    my @show = map { $_->[2] } grep { $_->[0] eq 'show' } @{ $RULES{$rules} };
    my @hide = map { $_->[2] } grep { $_->[0] eq 'hide' } @{ $RULES{$rules} };
    return hide_show($L->{models}, \@show, \@hide);
}

# a list location's answer: the visible models, filtered by $qs
sub answer_ok {
    my ($name, $r, $L, $rules, $qs) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my @vis = visible($L, $rules);
    my $args = filter_args($qs // '');
    my $e = %$args ? expect_filter(\@vis, $args)
                   : { status => 200, page => \@vis, more => 0, report => 0 };
    $e->{status} == 200 ? check_list($name, $r, $L, $e) : check_error($name, $r, $e);
}

# a lookup: the first visible model with that identity, or OpenAI's 404
sub lookup_ok {
    my ($name, $r, $L, $rules, $id) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my ($m) = grep { defined $_->{ident} && $_->{ident} eq $id } visible($L, $rules);
    is($r->{status}, $m ? 200 : 404, "$name: " . ($m ? 200 : 404));
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    if ($m) {
        ok($r->{content} eq $m->{raw}, "$name: the model object's bytes")
            or diag(substr($r->{content}, 0, 300));
    } else {
        is_deeply(MCTest::json_decode($r->{content}), { error => {
            message => "The model '$id' does not exist or you do not have access to it.",
            type => 'invalid_request_error', param => 'model', code => 'model_not_found' } },
            "$name: model_not_found") or diag($r->{content});
    }
}

sub get_b {
    my ($path) = @_;
    return $t->http('GET', $path, port => $t->port2);
}

sub stats {
    return MCTest::json_decode($t->get('/stats')->{content}) // {};
}

my $NOID = '{"object":"list","data":[{"id":"alpha-1","owned_by":"a"},'
         . '{"object":"model","owned_by":"a"},{"id":"beta-2","owned_by":"b"},'
         . '{"id":5,"name":"alpha-name"},{"id":"","owned_by":"e"},'
         . '{"id":null,"name":null},{"id":"Beta-3"}]}';
$t->mock_route({ path => '/noid', body => $NOID });

my $L = load_list($t->fixture('openai_models.json'));
my $N = load_list($NOID);

# the rules do something here: a test that cannot fail is no test
for my $rules (qw(hidden shown shown2 server_b override override_show http)) {
    my $n = () = visible($L, $rules);
    die "test bug: rules $rules keep $n of " . @{ $L->{models} } . " models\n"
        if $n == 0 || $n == @{ $L->{models} };
}

# ---- a plain list, then hide/show lists over the same pass ---------------------------

my $r = $t->get('/v1/models');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'plain list: MISS');
check_plain('plain list', $r, $L);

$r = $t->get('/hidden');
is($r->{headers}{'x-modelcache-status'}, 'HIT', '/hidden: a HIT on the plain list\'s entry');
answer_ok('/hidden', $r, $L, 'hidden');
answer_ok('/shown', $t->get('/shown'), $L, 'shown');
is($t->mock_count('/v1/models'), 1, 'a plain list and hide/show lists: one fetch');

# ---- filters over hidden lists ------------------------------------------------------

for my $qs ('', 'q=gpt-3.5', 'q=gpt-4o&sort=id&limit=3', 'q=tts', 'q=TTS&owned_by=system',
            'sort=-created&limit=5', 'sort=id', 'after=gpt-3.5-turbo', 'after=gpt-4o&limit=2',
            'owned_by=openai-internal', 'owned_by=openai&sort=id', 'limit=100000',
            'q=preview-2024&sort=created', 'q=gpt-4-&sort=-id&limit=4', 'limit=0') {
    answer_ok("/hidden-filter?$qs", $t->get("/hidden-filter?$qs"), $L, 'hidden', $qs);
}

for my $qs ('', 'q=o3', 'q=O3-MINI', 'q=gpt-4o-audio', 'q=gpt-5', 'sort=id',
            'sort=-created&limit=2',
            'sort=id&after=o3', 'q=gpt-4o&owned_by=system&limit=1', 'after=o3-mini',
            'owned_by=openai', 'q=realtime&sort=-id&after=gpt-4o-realtime-preview') {
    answer_ok("/shown-filter?$qs", $t->get("/shown-filter?$qs"), $L, 'shown', $qs);
}

# ---- lookups ---------------------------------------------------------------------------

for my $id (qw(gpt-3.5-turbo gpt-3.5-turbo-16k tts-1 tts-1-hd gpt-4o-mini-tts
               gpt-4o-realtime-preview-2024-12-17 gpt-4o-realtime-preview gpt-4o gpt-4-turbo
               gpt-4 o3 whisper-1 dall-e-3)) {
    lookup_ok("/hidden/models/$id", $t->get("/hidden/models/$id"), $L, 'hidden', $id);
}
for my $id (qw(gpt-4o gpt-4o-2024-08-06 o3 o3-pro o3-deep-research o3-mini gpt-4o-mini
               gpt-4o-audio-preview gpt-4o-mini-audio-preview gpt-5 o1 dall-e-3)) {
    lookup_ok("/shown/models/$id", $t->get("/shown/models/$id"), $L, 'shown', $id);
}
is($t->mock_count('/v1/models'), 1, 'lookups through hide/show: no fetch');

# ---- models without identity -------------------------------------------------------

$r = $t->get('/noid');
check_plain('/noid (no rules)', $r, $N);
answer_ok('/noid-hide (hide only: kept)', $t->get('/noid-hide'), $N, 'noid_hide');
answer_ok('/noid-hide?sort=id', $t->get('/noid-hide?sort=id'), $N, 'noid_hide', 'sort=id');
answer_ok('/noid-hide?sort=-id', $t->get('/noid-hide?sort=-id'), $N, 'noid_hide', 'sort=-id');
answer_ok('/noid-show (show .: dropped)', $t->get('/noid-show'), $N, 'noid_show');
answer_ok('/noid-show-any (show ^)', $t->get('/noid-show-any'), $N, 'noid_show_any');
answer_ok('/noid-show-any?q=alpha', $t->get('/noid-show-any?q=alpha'), $N, 'noid_show_any',
          'q=alpha');
answer_ok('/noid-show-any?owned_by=a', $t->get('/noid-show-any?owned_by=a'), $N,
          'noid_show_any', 'owned_by=a');
is($t->mock_count('/noid'), 1, '/noid: one fetch');

# ---- server level: inherited, replaced -------------------------------------------------

for my $qs ('', 'q=dall', 'q=WHISPER', 'sort=id&limit=3', 'q=e-3', 'after=dall-e-2') {
    my $path = '/v1/models' . (length $qs ? "?$qs" : '');
    answer_ok("server B $path", get_b($path), $L, 'server_b', $qs);
}
for my $id (qw(dall-e-3 dall-e-2 whisper-1 gpt-4o tts-1)) {
    lookup_ok("server B /v1/models/$id", get_b("/v1/models/$id"), $L, 'server_b', $id);
}
answer_ok('server B /override', get_b('/override'), $L, 'override');
answer_ok('server B /override-show', get_b('/override-show'), $L, 'override_show');
is($t->mock_count('/v1/models'), 1, 'both servers share the entry: one fetch');

# ---- hide/show answers are derived once and kept -------------------------------------

my $s0 = stats();
my $r1 = $t->get('/hidden');
my $s1 = stats();
is(($s1->{derived_builds} // -1) - ($s0->{derived_builds} // 0), 0,
   '/hidden again: no new derived answer');
is(($s1->{derived_hits} // -1) - ($s0->{derived_hits} // 0), 1,
   '/hidden again: a derived hit');
ok($r1->{content} eq $t->get('/hidden')->{content}, '/hidden again: the same bytes');

# ---- after a reload: http-level rules, changed location rules ---------------------------

$t->write_conf(config(2));
($code, $out) = $t->nginx_test;
is($code, 0, 'phase 2: nginx -t accepts rules at http level') or diag($out);
$t->reload unless $code;

$r = $t->get('/v1/models');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'after the reload: the entry is kept (HIT)');
answer_ok('after the reload: server A inherits the http level', $r, $L, 'http');
answer_ok('after the reload: /shown follows its new rules', $t->get('/shown'), $L, 'shown2');
answer_ok('after the reload: /shown-filter?sort=id&limit=3',
          $t->get('/shown-filter?sort=id&limit=3'), $L, 'shown2', 'sort=id&limit=3');
lookup_ok('after the reload: /shown/models/o3', $t->get('/shown/models/o3'), $L, 'shown2', 'o3');
lookup_ok('after the reload: /shown/models/o1-pro', $t->get('/shown/models/o1-pro'),
          $L, 'shown2', 'o1-pro');
answer_ok('after the reload: /hidden keeps its own rules', $t->get('/hidden'), $L, 'hidden');
answer_ok('after the reload: server B keeps its own rules', get_b('/v1/models'), $L, 'server_b');
lookup_ok('after the reload: server A /hidden/models/babbage-002 (own rules)',
          $t->get('/hidden/models/babbage-002'), $L, 'hidden', 'babbage-002');
is($t->mock_count('/v1/models'), 1, 'after the reload: still one fetch');

$t->done_testing;
