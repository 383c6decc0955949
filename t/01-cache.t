#!/usr/bin/perl

# Miss then hit: one provider fetch serves many requests on both workers;
# the client-facing headers (ETag/304, Age, Cache-Control, status header),
# HEAD, 405 for other methods, and the $modelcache_* variables.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use MCTest;
use Test::More;

my $t = MCTest->new;
$t->mock_start;

$t->write_conf(<<'EOF');
    log_format mc '$request_uri $status $modelcache_status $modelcache_age '
                  '$modelcache_key';
    access_log %%DIR%%/mc.log mc;

    modelcache_zone zone=models:8m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        add_header X-Worker $pid always;

        location /_provider/ {
            internal;
            proxy_pass http://127.0.0.1:%%MOCK%%/;
            proxy_set_header Accept-Encoding "";
        }

        location = /v1/models {
            modelcache      models;
            modelcache_pass /_provider/v1/models;
            modelcache_ttl  300s;
        }

        location = /quiet/v1/models {
            modelcache               models;
            modelcache_pass          /_provider/v1/models;
            modelcache_status_header off;
        }
    }
EOF
$t->run;

my $fixture = $t->fixture('openai_models.json');
my %auth = (Authorization => 'Bearer key-a');

# miss

my $r = $t->get('/v1/models', %auth);
is($r->{status}, 200, 'miss: 200');
is($r->{headers}{'x-modelcache-status'}, 'MISS', 'miss: status header');
ok($r->{content} eq $fixture, 'miss: body is the provider\'s bytes');
is($r->{headers}{'content-type'}, 'application/json', 'content type');
is($r->{headers}{'content-length'}, length $fixture, 'content length');
is($r->{headers}{'cache-control'}, 'private, max-age=300', 'cache-control');
is($r->{headers}{age}, 0, 'age 0 on a miss');
like($r->{headers}{etag}, qr/^"[0-9a-f]{32}"$/, 'strong etag');
my $etag = $r->{headers}{etag};
is($t->mock_count('/v1/models'), 1, 'one provider fetch');

my $seen = $t->mock_stats->{requests}[0]{headers};
is($seen->{authorization}, 'Bearer key-a', 'provider saw the credentials');

# hits on both workers, in parallel

my $res = $t->parallel(40, sub {
    my $r = $t->get('/v1/models', %auth);
    return {
        status => $r->{status},
        cache  => $r->{headers}{'x-modelcache-status'},
        same   => ($r->{content} eq $fixture ? 1 : 0),
        etag   => $r->{headers}{etag},
        worker => $r->{headers}{'x-worker'},
    };
});

is(scalar(grep { $_ && $_->{status} == 200 } @$res), 40, '40 hits: all 200');
is(scalar(grep { $_ && $_->{cache} eq 'HIT' } @$res), 40, '40 hits: all HIT');
is(scalar(grep { $_ && $_->{same} } @$res), 40, '40 hits: same bytes');
is(scalar(grep { $_ && $_->{etag} eq $etag } @$res), 40, '40 hits: same etag');
my %workers = map { $_->{worker} => 1 } grep { $_ } @$res;
is(scalar(keys %workers), 2, 'hits were served by both workers');
is($t->mock_count('/v1/models'), 1, 'still one provider fetch');

# Age grows, max-age shrinks

sleep 2;
$r = $t->get('/v1/models', %auth);
cmp_ok($r->{headers}{age}, '>=', 1, 'age grows on hits');
like($r->{headers}{'cache-control'}, qr/^private, max-age=(29[0-9])$/,
     'max-age is what is left of the ttl');

# conditional requests

$r = $t->get('/v1/models', %auth, 'If-None-Match' => $etag);
is($r->{status}, 304, 'If-None-Match with our etag: 304');
is($r->{content}, '', '304 has no body');
is($r->{headers}{etag}, $etag, '304 repeats the etag');

$r = $t->get('/v1/models', %auth, 'If-None-Match' => '"0123"');
is($r->{status}, 200, 'another etag: 200');
ok($r->{content} eq $fixture, 'another etag: whole body');

$r = $t->get('/v1/models', %auth,
             'If-Modified-Since' => 'Mon, 23 Nov 2099 00:00:00 GMT');
is($r->{status}, 200, 'If-Modified-Since of another date: 200');

my $lm = $r->{headers}{'last-modified'};
like($lm, qr/^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/,
     'Last-Modified: when the list was fetched');
$r = $t->get('/v1/models', %auth, 'If-Modified-Since' => $lm);
is($r->{status}, 304, 'If-Modified-Since the fetch: 304');
$r = $t->get('/v1/models', %auth, 'If-Unmodified-Since' => $lm);
is($r->{status}, 200, 'If-Unmodified-Since the fetch: 200, not 412');

# HEAD

$r = $t->head('/v1/models', %auth);
is($r->{status}, 200, 'HEAD: 200');
is($r->{content}, '', 'HEAD: no body');
is($r->{headers}{'content-length'}, length $fixture, 'HEAD: content length');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'HEAD: a hit');

my $other = $t->head('/v1/models', Authorization => 'Bearer key-b');
is($other->{headers}{'x-modelcache-status'}, 'MISS', 'HEAD can miss');
$r = $t->get('/v1/models', Authorization => 'Bearer key-b');
is($r->{headers}{'x-modelcache-status'}, 'HIT', 'a HEAD miss stores the list');
ok($r->{content} eq $t->fixture('openai_models_profile_b.json'),
   'with the whole body');

# other methods

for my $m (qw(POST PUT DELETE PATCH OPTIONS PURGE)) {
    $r = $t->http($m, '/v1/models', headers => \%auth, body => '{}');
    is($r->{status}, 405, "$m: 405");
    is($r->{headers}{allow}, 'GET, HEAD', "$m: Allow");
    my $e = MCTest::json_decode($r->{content});
    is($e && $e->{error}{type}, 'modelcache_method_not_allowed',
       "$m: JSON error body");
}

is($t->mock_count('/v1/models'), 2, 'two provider fetches in all (two keys)');

# modelcache_status_header off

$r = $t->get('/quiet/v1/models', %auth);
is($r->{status}, 200, 'status header off: 200');
ok(!exists $r->{headers}{'x-modelcache-status'},
   'status header off: no X-Modelcache-Status');

# the provider is asked without conditional or encoding headers

$t->mock_reset;
$t->get('/quiet/v1/models', 'Authorization' => 'Bearer key-c',
        'If-None-Match' => '"abc"', 'Accept-Encoding' => 'gzip',
        'Range' => 'bytes=0-10', 'X-Custom' => 'kept');
$seen = $t->mock_stats->{requests}[0]{headers};
ok(!exists $seen->{'if-none-match'}, 'provider did not get If-None-Match');
ok(!exists $seen->{'accept-encoding'}, 'provider did not get Accept-Encoding');
ok(!exists $seen->{range}, 'provider did not get Range');
is($seen->{'x-custom'}, 'kept', 'other client headers reach the provider');

# variables, from the access log

$t->stop;
my @log = split /\n/, $t->read_file('mc.log') // '';
my @miss = grep { m{^/v1/models 200 MISS 0 [0-9a-f]{64}$} } @log;
my @hit = grep { m{^/v1/models 200 HIT \d+ [0-9a-f]{64}$} } @log;
cmp_ok(scalar @miss, '>=', 1, '$modelcache_status MISS, age and key logged');
cmp_ok(scalar @hit, '>=', 40, '$modelcache_status HIT logged');
my %keys = map { (split / /)[4] => 1 } @miss, @hit;
is(scalar keys %keys, 2, 'two keys, one per credential');
unlike(join("\n", @log), qr/key-a|key-b/, 'no credential in the access log');

$t->done_testing;
