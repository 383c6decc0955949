#!/usr/bin/perl

# Big lists: the 1 MB OpenRouter list and a 12 MiB list are stored and served
# byte for byte (through proxy temp files, without them, and through tiny
# proxy buffers) with no buffer tuning; a list over max_entry is answered in
# full but not stored; 10 parallel clients on a cold 12 MiB key; a small zone
# under pressure evicts LRU entries and never fails a request.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;
use Digest::SHA qw(sha256_hex);

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    modelcache_zone zone=big:64m max_entry=16m;
    modelcache_zone zone=par:64m max_entry=16m;
    modelcache_zone zone=small8:8m;
    modelcache_zone zone=press:2m max_entry=1m;
    modelcache_zone zone=tiny:256k max_entry=128k;

    proxy_cache_path %%DIR%%/pcache keys_zone=pc:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /_p/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location /_pnotemp/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_max_temp_file_size 0;
        }

        location /_ptiny/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_buffers 4 4k;
            proxy_buffer_size 4k;
        }

        # proxy_cache makes the pipe write the whole body to a temp file
        # and hand it on as file buffers (bypassed: every fetch reaches
        # the provider)
        location /_pfile/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
            proxy_cache pc;
            proxy_cache_valid 200 1h;
            proxy_cache_bypass 1;
        }

        location = /or {
            modelcache      big;
            modelcache_pass /_p/openrouter/api/v1/models;
        }

        location = /big {
            modelcache      big;
            modelcache_pass /_p/big;
        }

        location = /big-notemp {
            modelcache      big;
            modelcache_pass /_pnotemp/big;
        }

        location = /big-tiny {
            modelcache      big;
            modelcache_pass /_ptiny/big;
        }

        location = /big-file {
            modelcache      big;
            modelcache_pass /_pfile/big;
        }

        location = /big-par {
            modelcache      par;
            modelcache_pass /_p/big;
        }

        location = /big-small {
            modelcache      small8;
            modelcache_pass /_p/big;
        }

        location = /press {
            modelcache       press;
            modelcache_pass  /_p/v1/models;
            modelcache_scope $arg_s;
        }

        location = /or-tiny {
            modelcache      tiny;
            modelcache_pass /_p/openrouter/api/v1/models;
        }

        location = /stats-big    { modelcache_stats big; }
        location = /stats-par    { modelcache_stats par; }
        location = /stats-small8 { modelcache_stats small8; }
        location = /stats-press  { modelcache_stats press; }
        location = /stats-tiny   { modelcache_stats tiny; }
    }
EOF
$t->run;

sub stats { return MCTest::json_decode($t->get($_[0])->{content}) }

my $or = $t->fixture('openrouter_models.json');
my $big = $t->fixture('adv_large_12mb.json');
my $big_sha = sha256_hex($big);
is(length $big, 12 * 1024 * 1024, '12 MiB fixture');

# ---- 1 MB OpenRouter list ---------------------------------------------------

my $r = $t->get('/or');
is($r->{status}, 200, 'OpenRouter: 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'OpenRouter: MISS');
ok($r->{content} eq $or, 'OpenRouter: MISS byte-identical');
$r = $t->get('/or');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'OpenRouter: HIT');
ok($r->{content} eq $or, 'OpenRouter: HIT byte-identical');
$r = $t->head('/or');
is($r->{status}, 200, 'OpenRouter HEAD: 200');
is($r->{headers}{'content-length'}, length $or, 'OpenRouter HEAD: content length');
is($r->{content}, '', 'OpenRouter HEAD: no body');
is($t->mock_count('/openrouter/api/v1/models'), 1, 'OpenRouter: one fetch');

# ---- 12 MiB list: default proxy settings, no temp file, tiny buffers --------

for my $case (['/big', 'default proxy buffers'],
              ['/big-notemp', 'proxy_max_temp_file_size 0'],
              ['/big-tiny', 'proxy_buffers 4 4k'],
              ['/big-file', 'body in a proxy temp file (proxy_cache)'])
{
    my ($path, $name) = @$case;
    my $before = $t->mock_count('/big');
    $r = $t->get($path);
    is($r->{status}, 200, "12 MiB, $name: 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "12 MiB, $name: MISS");
    is(length $r->{content}, length $big, "12 MiB, $name: MISS length");
    is(sha256_hex($r->{content}), $big_sha, "12 MiB, $name: MISS byte-identical");
    $r = $t->get($path);
    is($r->{status}, 200, "12 MiB, $name: HIT 200");
    is($r->{headers}{'x-modelcache-status'}, 'HIT', "12 MiB, $name: HIT");
    is(sha256_hex($r->{content}), $big_sha, "12 MiB, $name: HIT byte-identical");
    is($t->mock_count('/big') - $before, 1, "12 MiB, $name: one fetch");
}

is(stats('/stats-big')->{entries}, 5, 'zone big holds the five lists');
my @cached = grep { -f $_ && (-s $_) > length $big } glob($t->dir . '/pcache/*');
is(scalar @cached, 1, 'the proxy_cache fetch did go through a file');

# ---- over max_entry: answered in full, not stored ---------------------------

my $before = $t->mock_count('/big');
for my $i (1, 2) {
    $r = $t->get('/big-small');
    is($r->{status}, 200, "over max_entry #$i: 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "over max_entry #$i: MISS");
    is(sha256_hex($r->{content}), $big_sha, "over max_entry #$i: whole body");
}
is($t->mock_count('/big') - $before, 2, 'over max_entry: not stored, fetched twice');
$t->log_like(qr/\[warn\].*modelcache: provider answer of 12582912 bytes exceeds max_entry=4194304 of zone "small8", not stored/,
             'over max_entry: [warn] logged');
my $s = stats('/stats-small8');
is($s->{entries}, 0, 'over max_entry: zone small8 is empty');
is($s->{misses}, 2, 'over max_entry: counted as misses');

# ---- 10 parallel clients on a cold 12 MiB key -------------------------------

sub big_get {
    my $r = $t->get('/big-par');
    return { status => $r->{status}, cache => $r->{headers}{'x-modelcache-status'} // '',
             sha => sha256_hex($r->{content}) };
}

$before = $t->mock_count('/big');
my $res = $t->parallel(10, sub { big_get() });
is(scalar(grep { $_ && $_->{status} == 200 } @$res), 10, 'parallel cold: all 200');
is(scalar(grep { $_ && $_->{sha} eq $big_sha } @$res), 10,
   'parallel cold: all byte-identical');
is(scalar(grep { $_ && $_->{cache} =~ /^(?:MISS|HIT)$/ } @$res), 10,
   'parallel cold: MISS or HIT');
my $fetches = $t->mock_count('/big') - $before;
cmp_ok($fetches, '>=', 1, "parallel cold: at least one fetch ($fetches)");
cmp_ok($fetches, '<=', 10, 'parallel cold: at most one fetch per client');

$before = $t->mock_count('/big');
$res = $t->parallel(10, sub { big_get() });
is(scalar(grep { $_ && $_->{status} == 200 } @$res), 10, 'parallel hits: all 200');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @$res), 10, 'parallel hits: all HIT');
is(scalar(grep { $_ && $_->{sha} eq $big_sha } @$res), 10,
   'parallel hits: all byte-identical');
is($t->mock_count('/big') - $before, 0, 'parallel hits: no new fetch');
is(stats('/stats-par')->{entries}, 1, 'zone par: one entry');

# ---- zone pressure: a 2m zone filled with 15 KB lists -----------------------

# Each entry takes at least 16 KiB of the zone (the list is 14752 bytes plus
# the entry header, scope and pass: four 4 KiB pages), so no more than
# size / 16 KiB entries fit; store 30 more distinct scopes than that.

my $openai = $t->fixture('openai_models.json');
$s = stats('/stats-press');
is($s->{size}, 2 * 1024 * 1024, 'zone press: 2m');
my $fit = int($s->{size} / 16384);
my $n = $fit + 30;

$before = $t->mock_count('/v1/models');
my ($ok, @bad) = (0);
for my $i (0 .. $n - 1) {
    $r = $t->get("/press?s=scope$i");
    if ($r->{status} == 200 && $r->{content} eq $openai
        && $r->{headers}{'x-modelcache-status'} eq 'MISS')
    {
        $ok++;
    } else {
        push @bad, "scope$i: $r->{status} " . ($r->{headers}{'x-modelcache-status'} // '-');
    }
}
is($ok, $n, "zone press: all $n distinct scopes answered 200 MISS with the list")
    or diag(join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);
is($t->mock_count('/v1/models') - $before, $n, "zone press: $n fetches");

$s = stats('/stats-press');
cmp_ok($s->{entries}, '>=', 1, "zone press: entries ($s->{entries}) >= 1");
cmp_ok($s->{entries}, '<=', $fit, "zone press: entries <= $fit");
cmp_ok($s->{evictions}, '>=', $n - $fit, "zone press: evictions ($s->{evictions}) >= 30");
is($s->{entries} + $s->{evictions}, $n, 'zone press: every list stored, then kept or evicted');
cmp_ok($s->{used}, '<=', $s->{size}, 'zone press: used <= size');

$r = $t->get('/press?s=scope' . ($n - 1));
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'zone press: most recent scope is a HIT');
ok($r->{content} eq $openai, 'zone press: with its list');
$r = $t->get('/press?s=scope0');
is($r->{status}, 200, 'zone press: oldest scope answered');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'zone press: oldest scope was evicted (LRU)');
ok($r->{content} eq $openai, 'zone press: oldest scope refetched whole');

# ---- a 256k zone and the 1 MB list: answered, not stored --------------------

$before = $t->mock_count('/openrouter/api/v1/models');
for my $i (1, 2) {
    $r = $t->get('/or-tiny');
    is($r->{status}, 200, "256k zone #$i: 200");
    is($r->{headers}{'x-modelcache-status'}, 'MISS', "256k zone #$i: MISS");
    ok($r->{content} eq $or, "256k zone #$i: whole 1 MB list");
}
is($t->mock_count('/openrouter/api/v1/models') - $before, 2, '256k zone: not stored');
$t->log_like(qr/\[warn\].*modelcache: provider answer of 1008402 bytes exceeds max_entry=131072 of zone "tiny", not stored/,
             '256k zone: [warn] logged');
is(stats('/stats-tiny')->{entries}, 0, '256k zone: empty');
$t->log_unlike(qr/\[alert\]/, 'no [alert] (no "no room" in any zone)');

$t->done_testing;
