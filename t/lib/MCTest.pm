package MCTest;

# Test harness for ngx_http_modelcache_module (Test::Nginx is not packaged for
# Debian 12).  One MCTest object owns a temp prefix dir, three loopback ports,
# an nginx master started from a generated config, and the mock provider
# (t/mock/provider.py).  Setup failures die: missing tools fail tests, never skip.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Handle;
use IO::Socket::INET;
use JSON::PP ();
use POSIX ();
use Scalar::Util qw(weaken);
use Test::More ();
use Time::HiRes qw(time sleep);

my $REPO = abs_path(dirname(abs_path(__FILE__)) . '/../..');
my $JSON = JSON::PP->new->utf8->canonical->allow_nonref->max_depth(100_000);

# Log lines that mean a test run went wrong whatever the test checked.
my $BAD_LOG_LINE = qr/\[(?:alert|emerg|crit)\]|\bsignal (?:11|6)\b|exited on signal
                     |AddressSanitizer|LeakSanitizer|runtime\ error:/x;

my @INSTANCES;    # weak refs, so END can stop whatever DESTROY did not

sub new {
    my ($class, %opt) = @_;
    my $self = bless {
        owner    => $$,
        nginx    => $opt{nginx} // $ENV{NGINX_BIN} // '/usr/sbin/nginx',
        module   => $opt{module} // $ENV{MODELCACHE_MODULE}
            // "$REPO/build/ngx_http_modelcache_module.so",
        fixtures => $opt{fixtures} // $ENV{MODELCACHE_FIXTURES} // "$REPO/../shared/fixtures",
        workers  => 2,
        par_runs => 0,
    }, $class;

    -x $self->{nginx}
        or die "MCTest: nginx binary '$self->{nginx}' is not executable (set NGINX_BIN)\n";
    -d $self->{fixtures}
        or die "MCTest: fixtures dir '$self->{fixtures}' not found (set MODELCACHE_FIXTURES)\n";
    $self->{fixtures} = abs_path($self->{fixtures});

    $self->{dir} = tempdir('mctest-XXXXXX', TMPDIR => 1, CLEANUP => !$ENV{MCTEST_KEEP});
    # nginx workers run as nobody and must reach the temp paths inside.
    chmod 0755, $self->{dir} or die "MCTest: chmod $self->{dir}: $!\n";
    Test::More::diag("MCTest: keeping $self->{dir}") if $ENV{MCTEST_KEEP};

    @$self{qw(port port2 mock_port)} = _free_ports(3);
    push @INSTANCES, $self;
    weaken($INSTANCES[-1]);
    return $self;
}

sub port      { $_[0]{port} }
sub port2     { $_[0]{port2} }
sub mock_port { $_[0]{mock_port} }
sub dir       { $_[0]{dir} }
sub repo      { $REPO }
sub conf_text { $_[0]{conf_text} }
sub conf_path { "$_[0]{dir}/nginx.conf" }
sub master_pid { $_[0]{master_pid} }

# a file under the test's prefix dir (a log of its own, say), or undef
sub read_file {
    my ($self, $name) = @_;
    return _read_file("$self->{dir}/$name");
}

sub fixture {
    my ($self, $name) = @_;
    return _read_file("$self->{fixtures}/$name")
        // die "MCTest: cannot read fixture '$name' in $self->{fixtures}: $!\n";
}

sub json_decode {
    my ($text) = @_;
    return undef unless defined $text;
    local $^W = 0;    # JSON::PP warns "Deep recursion" on deeply nested (valid) input under -w
    return eval { $JSON->decode($text) };
}

# ---- mock provider ---------------------------------------------------------

sub mock_start {
    my ($self, %opt) = @_;
    die "MCTest: mock already running (pid $self->{mock_pid})\n" if $self->{mock_pid};
    my $python = _which('python3') // die "MCTest: python3 not found in PATH\n";
    my @cmd = ($python, "$REPO/t/mock/provider.py",
        '--port' => $self->{mock_port}, '--fixtures' => $self->{fixtures},
        '--pidfile' => "$self->{dir}/mock.pid", '--exit-with-parent');
    push @cmd, '--delay-ms' => $opt{delay_ms} if defined $opt{delay_ms};

    my $pid = _spawn(@cmd);
    my $state = _wait_until(time + 10, sub {
        return 'exited' if waitpid($pid, POSIX::WNOHANG()) == $pid;
        return $self->_mock_request('GET', 'stats', undef, 1)->{success} ? 'up' : undef;
    }) // 'silent';
    die "MCTest: mock provider exited at startup (status $?)\n" if $state eq 'exited';
    $self->{mock_pid} = $pid;
    if ($state ne 'up') {
        $self->_stop_mock;
        die "MCTest: mock provider did not answer on port $self->{mock_port} within 10 s\n";
    }
    return $pid;
}

sub mock_route { my ($self, $spec) = @_; return $self->_mock_call('POST', 'route', $spec) }
sub mock_reset { my ($self) = @_; return $self->_mock_call('POST', 'reset', {}) }
sub mock_stats { my ($self) = @_; return $self->_mock_call('GET', 'stats') }
sub mock_total { my ($self) = @_; return $self->mock_stats->{total} }

sub mock_count {
    my ($self, $path) = @_;
    return $self->mock_stats->{by_path}{$path} // 0;
}

sub _mock_call {
    my ($self, $method, $action, $payload) = @_;
    die "MCTest: mock not started\n" unless $self->{mock_pid};
    my $r = $self->_mock_request($method, $action, $payload, 30);
    my $data = json_decode($r->{content});
    die "MCTest: mock $action failed: $r->{status} $r->{content}\n"
        unless $r->{status} == 200 && ref $data eq 'HASH';
    return $data;
}

sub _mock_request {
    my ($self, $method, $action, $payload, $timeout) = @_;
    my %req = (headers => { 'Content-Type' => 'application/json' });
    $req{content} = $JSON->encode($payload) if defined $payload;
    return HTTP::Tiny->new(timeout => $timeout, keep_alive => 0)
        ->request($method, "http://127.0.0.1:$self->{mock_port}/__mock/$action", \%req);
}

sub _stop_mock {
    my ($self) = @_;
    my $pid = delete $self->{mock_pid} or return;
    kill 'TERM', $pid;
    return if _wait_until(time + 5, sub { waitpid($pid, POSIX::WNOHANG()) != 0 });
    kill 'KILL', $pid;
    waitpid($pid, 0);
}

# ---- nginx -----------------------------------------------------------------

sub write_conf {
    my ($self, $http_body, %opt) = @_;
    my $load_module = $opt{load_module} // 1;
    die "MCTest: module '$self->{module}' not found: build it first or set MODELCACHE_MODULE\n"
        if $load_module && !-f $self->{module};
    my $module = abs_path($self->{module});    # nginx would resolve a relative path against -p
    $self->{workers} = $opt{workers} // 2;
    my $dir = $self->{dir};
    my $level = $opt{error_log_level} // 'info';
    my $main = $self->_substitute($opt{main} // '');
    my $http = $self->_substitute($http_body);

    my $text = ($load_module ? "load_module $module;\n" : '') . <<"CONF";
worker_processes $self->{workers};
daemon on;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log $level;
$main
events { worker_connections 1024; }

http {
    access_log $dir/access.log;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy_temp;
    fastcgi_temp_path $dir/fastcgi_temp;
    uwsgi_temp_path $dir/uwsgi_temp;
    scgi_temp_path $dir/scgi_temp;

$http
}
CONF
    _write_file($self->conf_path, $text);
    $self->{conf_text} = $text;
    return $text;
}

sub _substitute {
    my ($self, $text) = @_;
    my %value = (PORT => $self->{port}, PORT2 => $self->{port2},
                 MOCK => $self->{mock_port}, DIR => $self->{dir});
    $text =~ s/%%(PORT2|PORT|MOCK|DIR)%%/$value{$1}/g;
    return $text;
}

sub nginx_test {
    my ($self) = @_;
    my ($code, $out) = _capture($self->_nginx_cmd('-t'));
    return ($code, $out);
}

sub _nginx_cmd {
    my ($self, @extra) = @_;
    return ($self->{nginx}, @extra, '-p', "$self->{dir}/", '-c', $self->conf_path);
}

sub run {
    my ($self) = @_;
    die "MCTest: nginx already running (pid $self->{master_pid})\n" if $self->{master_pid};
    die "MCTest: run() before write_conf()\n" unless defined $self->{conf_text};
    unlink "$self->{dir}/nginx.pid";

    my ($code, $out) = _capture($self->_nginx_cmd);
    $self->_start_failed("nginx exited with code $code:\n$out") if $code;

    my $deadline = time + 10;
    my $pid = _wait_until($deadline, sub {
        my $p = _read_file("$self->{dir}/nginx.pid") // return;
        $p =~ /^(\d+)/ && _alive($1) ? $1 : undef;
    }) or $self->_start_failed('no live master behind the pid file after 10 s');
    $self->{master_pid} = $pid;

    # A config may not listen on %%PORT%% at all; only wait for it when it does.
    if ($self->{conf_text} =~ /:$self->{port}\b/) {
        _wait_until($deadline, sub { _port_open($self->{port}) })
            or $self->_start_failed("port $self->{port} does not accept connections");
    }
    _wait_until($deadline, sub { $self->worker_pids == $self->{workers} })
        or $self->_start_failed("expected $self->{workers} worker processes");
    return $pid;
}

sub _start_failed {
    my ($self, $why) = @_;
    die "MCTest: nginx start failed: $why\n" . $self->_log_tail(30);
}

sub worker_pids {
    my ($self) = @_;
    my $master = $self->{master_pid} or return;
    # Children that are not workers (cache manager/loader) are left out.
    my @pids = sort { $a <=> $b }
        grep { (_read_file("/proc/$_/cmdline") // '') =~ /worker process/ }
        _children_of($master);
    return @pids;
}

sub reload {
    my ($self) = @_;
    my $master = $self->{master_pid} or die "MCTest: reload() while nginx is not running\n";
    my %old = map { $_ => 1 } $self->worker_pids;
    kill 'HUP', $master or die "MCTest: cannot signal nginx master $master: $!\n";
    _wait_until(time + 15, sub {
        my @now = $self->worker_pids;
        return !grep({ $old{$_} } @now) && @now == $self->{workers};
    }) or die "MCTest: reload did not replace the workers within 15 s\n" . $self->_log_tail(30);
}

sub stop {
    my ($self) = @_;
    return unless $$ == $self->{owner};
    $self->_stop_nginx;
    $self->_stop_mock;
}

sub _stop_nginx {
    my ($self) = @_;
    my $master = $self->{master_pid} or return;
    my @workers = $self->worker_pids;
    delete $self->{master_pid};
    for my $step (['QUIT', 10], ['TERM', 5], ['KILL', 5]) {
        my ($signal, $wait) = @$step;
        kill $signal, $master;
        return if _wait_until(time + $wait, sub { !_alive($master) });
        Test::More::diag("MCTest: nginx master $master ignored $signal");
    }
    kill 'KILL', grep { _alive($_) } @workers;
}

sub DESTROY {
    my ($self) = @_;
    local ($?, $@);
    $self->stop;
}

END {
    local $?;
    $_ && $_->stop for @INSTANCES;
}

# ---- HTTP ------------------------------------------------------------------

sub http {
    my ($self, $method, $path, %opt) = @_;
    my $ua = HTTP::Tiny->new(keep_alive => 0, timeout => $opt{timeout} // 60, max_redirect => 0);
    my %req = (headers => $opt{headers} // {});
    $req{content} = $opt{body} if defined $opt{body};
    my $port = $opt{port} // $self->{port};
    my $r = _request_once($ua, $method, "http://127.0.0.1:$port$path", \%req);
    return {
        status  => $r->{status},
        reason  => $r->{reason},
        headers => $r->{headers} // {},
        content => $r->{content} // '',
    };
}

# HTTP::Tiny->request silently repeats a GET/HEAD whose connection broke
# ("Unexpected end of stream"), which would send a second request to nginx and
# skew upstream counts.  So make exactly one attempt through its _request and
# turn errors into the same 599 response request() would give.
sub _request_once {
    my ($ua, $method, $url, $args) = @_;
    my $r = eval { $ua->_request($method, $url, $args) };
    return $r if $r;
    my $e = $@;
    return $e if ref $e eq 'HASH' && exists $e->{status};
    return { status => 599, reason => 'Internal Exception', content => "$e",
             headers => { 'content-type' => 'text/plain' } };
}

sub get  { my ($self, $path, %headers) = @_; return $self->http('GET',  $path, headers => \%headers) }
sub head { my ($self, $path, %headers) = @_; return $self->http('HEAD', $path, headers => \%headers) }

# Runs $code->($i) in $n forked children released at the same moment; returns
# their results in order (undef, with a diag, for a child that died or timed out).
sub parallel {
    my ($self, $n, $code, %opt) = @_;
    my $timeout = $opt{timeout} // 60;
    my $run = ++$self->{par_runs};
    my $result_file = sub { "$self->{dir}/parallel-$run-$_[0].json" };

    pipe(my $gate_r, my $gate_w) or die "MCTest: pipe: $!\n";
    STDOUT->flush;
    STDERR->flush;
    my %kids;    # pid => index
    for my $i (0 .. $n - 1) {
        my $pid = fork // do { close $gate_w; _kill_and_reap(keys %kids); die "MCTest: fork: $!\n" };
        if (!$pid) {
            close $gate_w;
            _parallel_child($i, $code, $gate_r, $result_file->($i));
        }
        $kids{$pid} = $i;
    }
    close $gate_r;
    close $gate_w;    # every write end is now closed: all children see EOF together

    my @late = _reap_until(time + $timeout, keys %kids);
    _kill_and_reap(@late);
    my %timed_out = map { $kids{$_} => 1 } @late;
    return [ map { _parallel_result($_, $result_file->($_), $timed_out{$_}) } 0 .. $n - 1 ];
}

sub _parallel_child {
    my ($i, $code, $gate, $file) = @_;
    sysread($gate, my $byte, 1);
    my %out;
    eval { $out{value} = $code->($i); 1 } or $out{error} = "$@";
    my $encoded = eval { $JSON->encode(\%out) } // $JSON->encode({ error => "result not JSON: $@" });
    _write_file("$file.tmp", $encoded);
    rename "$file.tmp", $file;
    # _exit: no END blocks, no DESTROY stopping the parent's nginx, no TAP output.
    POSIX::_exit(0);
}

sub _parallel_result {
    my ($i, $file, $timed_out) = @_;
    my $data = json_decode(_read_file($file));
    unlink $file;
    my $problem = $timed_out ? 'timed out'
                : !$data     ? 'exited without a result'
                : $data->{error};
    if (defined $problem) {
        Test::More::diag("MCTest: parallel child $i: $problem");
        return undef;
    }
    return $data->{value};
}

sub _reap_until {
    my ($deadline, @pids) = @_;
    while (@pids && time < $deadline) {
        @pids = grep { waitpid($_, POSIX::WNOHANG()) == 0 } @pids;
        sleep 0.01 if @pids;
    }
    return @pids;
}

sub _kill_and_reap {
    my (@pids) = @_;
    return unless @pids;
    kill 'KILL', @pids;
    waitpid($_, 0) for @pids;
}

# Polls $cond until it returns true (that value is returned) or $timeout
# seconds (default 10) pass (undef).
sub wait_for {
    my ($self, $cond, $timeout) = @_;
    return _wait_until(time + ($timeout // 10), $cond);
}

# ---- error log -------------------------------------------------------------

sub error_log {
    my ($self) = @_;
    return _read_file("$self->{dir}/error.log") // '';
}

sub log_like {
    my ($self, $re, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    Test::More::ok($self->error_log =~ $re, $name // "error log matches $re")
        or Test::More::diag($self->_log_tail(20));
}

sub log_unlike {
    my ($self, $re, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my @hits = grep { $_ =~ $re } split /^/, $self->error_log;
    Test::More::ok(!@hits, $name // "error log does not match $re")
        or Test::More::diag(join '', @hits);
}

# opt allow => [qr/.../, ...]: bad lines matching one of these are expected.
sub done_testing {
    my ($self, %opt) = @_;
    $self->stop;
    my @allow = @{ $opt{allow} // [] };
    my @bad = grep { my $l = $_; $l =~ $BAD_LOG_LINE && !grep { $l =~ $_ } @allow }
        split /^/, $self->error_log;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    Test::More::ok(!@bad, 'no alerts, emergs or crashes in error log')
        or Test::More::diag(join '', @bad);
    Test::More::done_testing();
}

sub _log_tail {
    my ($self, $lines) = @_;
    my @log = split /^/, $self->error_log;
    splice @log, 0, @log - $lines if @log > $lines;
    return "--- last lines of $self->{dir}/error.log ---\n" . join('', @log);
}

# ---- helpers ---------------------------------------------------------------

sub _free_ports {
    my ($n) = @_;
    # Stay below the ephemeral range, so no client socket can take a port
    # between our check and nginx's bind.
    my ($low) = split ' ', _read_file('/proc/sys/net/ipv4/ip_local_port_range') // '';
    $low = 32768 unless $low && $low > 12000;
    my %taken;
    for (1 .. 1000) {
        my $port = 10000 + int rand($low - 10000);
        next if $taken{$port} || !_port_free($port);
        $taken{$port} = 1;
        return sort { $a <=> $b } keys %taken if keys %taken == $n;
    }
    die "MCTest: could not find $n free loopback ports\n";
}

sub _port_free {
    my ($port) = @_;
    my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
        Proto => 'tcp', Listen => 1, ReuseAddr => 1) or return 0;
    close $sock;
    return 1;
}

sub _port_open {
    my ($port) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 1) or return 0;
    close $sock;
    return 1;
}

# Polls $cond every 20 ms until it returns true or $deadline passes.
sub _wait_until {
    my ($deadline, $cond) = @_;
    while (1) {
        my $v = $cond->();
        return $v if $v;
        return undef if time >= $deadline;
        sleep 0.02;
    }
}

# (state, ppid) from /proc/<pid>/stat; comm may hold spaces and parentheses.
sub _proc_stat {
    my ($pid) = @_;
    my $stat = _read_file("/proc/$pid/stat") // return;
    return $stat =~ /.*\)\s+(\S)\s+(\d+)/s ? ($1, $2) : ();
}

sub _alive {
    my ($pid) = @_;
    my ($state) = _proc_stat($pid);
    return defined $state && $state ne 'Z';
}

sub _children_of {
    my ($parent) = @_;
    opendir(my $dh, '/proc') or die "MCTest: cannot read /proc: $!\n";
    return grep {
        my ($state, $ppid) = _proc_stat($_);
        defined $state && $ppid == $parent && $state ne 'Z';
    } grep { /^\d+$/ } readdir $dh;
}

sub _which {
    my ($name) = @_;
    for my $dir (split /:/, $ENV{PATH} // '') {
        return "$dir/$name" if $dir ne '' && -x "$dir/$name" && !-d _;
    }
    return undef;
}

# fork + exec with stdin from /dev/null and stdout onto stderr (stdout is TAP).
sub _spawn {
    my (@cmd) = @_;
    STDOUT->flush;
    STDERR->flush;
    my $pid = fork // die "MCTest: fork: $!\n";
    return $pid if $pid;
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>&', \*STDERR);
    exec { $cmd[0] } @cmd or print STDERR "MCTest: exec $cmd[0]: $!\n";
    POSIX::_exit(127);
}

# Runs a command to completion; returns (exit code, stdout+stderr).
sub _capture {
    my (@cmd) = @_;
    STDOUT->flush;
    STDERR->flush;
    my $pid = open(my $fh, '-|') // die "MCTest: fork: $!\n";
    if (!$pid) {
        open(STDIN, '<', '/dev/null');
        open(STDERR, '>&', \*STDOUT);
        exec { $cmd[0] } @cmd or print STDERR "MCTest: exec $cmd[0]: $!\n";
        POSIX::_exit(127);
    }
    my $out = do { local $/; <$fh> } // '';
    close $fh;
    my $code = $? & 127 ? 128 + ($? & 127) : $? >> 8;
    return ($code, $out);
}

sub _read_file {
    my ($path) = @_;
    open(my $fh, '<:raw', $path) or return undef;
    local $/;
    my $data = <$fh>;
    return $data // '';
}

sub _write_file {
    my ($path, $data) = @_;
    open(my $fh, '>:raw', $path) or die "MCTest: cannot write $path: $!\n";
    print {$fh} $data;
    close $fh or die "MCTest: cannot write $path: $!\n";
}

1;
