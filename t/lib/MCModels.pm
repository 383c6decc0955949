package MCModels;

# The independent expectation: what the module should answer, computed from
# the fixtures (spec: /work/spec4.md): model lists read byte for byte, each
# model's identity, owned_by and creation time, filters, sort, the envelope
# written compactly, hide/show; and the checks of an answer against it.

use strict;
use warnings;
use sort 'stable';

use Exporter qw(import);
use JSON::PP ();
use MCTest ();
use Test::More import => [qw(diag is is_deeply ok)];

our @EXPORT_OK = qw(load_list pct_encode filter_args expect_filter sort_models
                    expect_members envelope_text hide_show
                    check_list check_error check_plain first_difference);

# ============================================================================
# A provider's list, read byte for byte
# ============================================================================

my $JSON = JSON::PP->new->utf8->allow_nonref;
my $WS   = qr/[ \t\n\r]*/;
my $STR  = qr/"(?:[^"\\]++|\\.)*+"/s;

# the raw text of the JSON value at pos($$text)
sub raw_value {
    my ($text) = @_;
    $$text =~ /\G$WS/gc;
    my $start = pos($$text) // 0;
    if ($$text =~ /\G[\[{]/gc) {
        my $depth = 1;
        while ($depth) {
            if    ($$text =~ /\G[^"\[\]{}]++/gc) {}
            elsif ($$text =~ /\G$STR/gc)         {}
            elsif ($$text =~ /\G[\[{]/gc)        { $depth++ }
            elsif ($$text =~ /\G[\]}]/gc)        { $depth-- }
            else  { die "unterminated value at byte $start\n" }
        }
    } elsif ($$text !~ /\G(?:$STR|[-+.0-9eE]+|true|false|null)/gc) {
        die "no JSON value at byte $start\n";
    }
    return substr($$text, $start, pos($$text) - $start);
}

# [ [raw key, raw value], ... ]: a JSON object text's members, in order
sub raw_members {
    my ($text) = @_;
    pos($text) = 0;
    $text =~ /\G$WS\{$WS/gc or die "not a JSON object\n";
    my @m;
    if ($text !~ /\G\}/gc) {
        while (1) {
            $text =~ /\G$WS($STR)$WS:/gc
                or die 'no member name at byte ' . (pos($text) // 0) . "\n";
            my $key = $1;
            push @m, [$key, raw_value(\$text)];
            $text =~ /\G$WS/gc;
            next if $text =~ /\G,/gc;
            $text =~ /\G\}/gc or die 'no , or } at byte ' . pos($text) . "\n";
            last;
        }
    }
    $text =~ /\G$WS\z/gc or die "bytes after the object\n";
    return \@m;
}

# the raw texts of a JSON array text's elements
sub raw_elements {
    my ($text) = @_;
    pos($text) = 0;
    $text =~ /\G$WS\[$WS/gc or die "not a JSON array\n";
    my @e;
    return \@e if $text =~ /\G\]/gc;
    while (1) {
        push @e, raw_value(\$text);
        $text =~ /\G$WS/gc;
        next if $text =~ /\G,/gc;
        $text =~ /\G\]/gc or die 'no , or ] at byte ' . pos($text) . "\n";
        last;
    }
    return \@e;
}

sub days_from_civil {
    my ($y, $m, $d) = @_;
    $y -= 1 if $m <= 2;
    my $era = int(($y >= 0 ? $y : $y - 399) / 400);
    my $yoe = $y - $era * 400;
    my $doy = int((153 * ($m > 2 ? $m - 3 : $m + 9) + 2) / 5) + $d - 1;
    my $doe = $yoe * 365 + int($yoe / 4) - int($yoe / 100) + $doy;
    return $era * 146097 + $doe - 719468;
}

# YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM) -> epoch seconds, or undef
sub rfc3339 {
    my ($s) = @_;
    my ($y, $mo, $d, $h, $mi, $sec, $tz) = $s =~
        /\A(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)\z/
        or return undef;
    my $off = 0;
    if ($tz ne 'Z') {
        my ($sign, $oh, $om) = $tz =~ /\A([+-])(\d\d):(\d\d)\z/;
        $off = ($oh * 3600 + $om * 60) * ($sign eq '-' ? -1 : 1);
    }
    return days_from_civil($y, $mo, $d) * 86400 + $h * 3600 + $mi * 60 + $sec - $off;
}

sub utf8_bytes {
    my ($s) = @_;
    utf8::encode($s);
    return $s;
}

# a model: its bytes, decoded object, identity (bytes), owned_by (bytes) and
# creation time; JSON types are read from the provider's bytes (JSON::PP
# decodes 1e3 as an integer)
sub model {
    my ($obj, $raw, $idx) = @_;
    my %m = (obj => $obj, raw => $raw, idx => $idx);
    return \%m unless ref $obj eq 'HASH';
    my %v;
    $v{ $JSON->decode($_->[0]) } = $_->[1] for @{ raw_members($raw) };
    my $string = sub { defined $v{ $_[0] } && $v{ $_[0] } =~ /\A"/ };
    for my $k ('id', 'name') {
        next unless $string->($k);
        $m{ident_chars} = $obj->{$k};
        $m{ident} = utf8_bytes($obj->{$k});
        last;
    }
    $m{owned_by} = utf8_bytes($obj->{owned_by}) if $string->('owned_by');
    if (defined $v{created} && $v{created} =~ /\A-?(?:0|[1-9][0-9]*)\z/) {
        $m{created} = $obj->{created};
    } elsif ($string->('created_at')) {
        $m{created} = rfc3339($obj->{created_at});
    } elsif ($string->('modified_at')) {
        $m{created} = rfc3339($obj->{modified_at});
    }
    return \%m;
}

# a provider list: its top-level members (raw), the list member, the models
sub load_list {
    my ($text, $field) = @_;
    my $doc = $JSON->decode($text);
    my @members = map { { kraw => $_->[0], key => $JSON->decode($_->[0]), raw => $_->[1] } }
                  @{ raw_members($text) };
    my %has = map { $_->{key} => $_ } @members;
    my $lk = $field // (exists $has{data} ? 'data' : 'models');
    my $raws = raw_elements($has{$lk}{raw});
    my $objs = $doc->{$lk};
    die "load_list: $lk: raw and decoded lists differ\n" unless @$raws == @$objs;
    return { text => $text, members => \@members, list_key => $lk,
             models => [ map { model($objs->[$_], $raws->[$_], $_) } 0 .. $#$objs ] };
}

# ============================================================================
# Filters and sort
# ============================================================================

sub pct_decode {
    my ($s) = @_;
    $s =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    return $s;
}

sub pct_encode {
    my ($s) = @_;
    $s =~ s/([^A-Za-z0-9._~-])/sprintf '%%%02X', ord $1/ge;
    return $s;
}

sub lc_ascii {
    my ($s) = @_;
    $s =~ tr/A-Z/a-z/;
    return $s;
}

my %FILTER_ARG = map { $_ => 1 } qw(q owned_by sort limit after);

# the filter args of a query string: first occurrence, percent-decoded
# ('+' stays), an empty value is no arg
sub filter_args {
    my ($qs) = @_;
    my (%seen, %args);
    for my $pair (split /&/, $qs // '') {
        my ($k, $v) = split /=/, $pair, 2;
        next unless defined $k && $FILTER_ARG{$k} && !$seen{$k}++;
        $v = pct_decode($v // '');
        $args{$k} = $v if length $v;
    }
    return \%args;
}

sub bad_arg {
    my ($args) = @_;
    return 'sort' if defined $args->{sort} && $args->{sort} !~ /\A-?(?:id|created)\z/;
    if (defined(my $l = $args->{limit})) {
        return 'limit' if $l !~ /\A[0-9]+\z/;
        (my $n = $l) =~ s/\A0+//;
        return 'limit' if $n eq '' || length $n > 6 || $n > 100000;
    }
    return undef;
}

sub not_found {
    my ($param, $message) = @_;
    my %e = (type => 'invalid_request_error', param => $param, code => 'model_not_found');
    $e{message} = $message if defined $message;
    return { status => 404, error => \%e };
}

sub sort_models {
    my ($how, @m) = @_;
    my $desc = $how =~ s/\A-//;
    if ($how eq 'id') {
        return $desc ? sort { ($b->{ident} // '') cmp ($a->{ident} // '') } @m
                     : sort { ($a->{ident} // '') cmp ($b->{ident} // '') } @m;
    }
    return sort {
        my ($x, $y) = ($a->{created}, $b->{created});
        !defined $x ? (defined $y ? 1 : 0)
          : !defined $y ? -1
          : $desc ? $y <=> $x : $x <=> $y
    } @m;
}

# the answer for filter args over @$models (hide/show already applied):
# { status => 200, page, more, report } or { status => 4xx, error }
sub expect_filter {
    my ($models, $args) = @_;
    if (my $p = bad_arg($args)) {
        return { status => 400, error => { type => 'invalid_request_error', param => $p,
                                           code => 'invalid_filter' } };
    }
    my @m = @$models;
    if (defined $args->{q}) {
        my $q = lc_ascii($args->{q});
        @m = grep { defined $_->{ident} && index(lc_ascii($_->{ident}), $q) >= 0 } @m;
    }
    if (defined $args->{owned_by}) {
        @m = grep { defined $_->{owned_by} && $_->{owned_by} eq $args->{owned_by} } @m;
    }
    if (!@m && (defined $args->{q} || defined $args->{owned_by})) {
        return not_found(defined $args->{owned_by} ? 'owned_by' : 'q',
                         'No model matches the filter.');
    }
    @m = sort_models($args->{sort}, @m) if defined $args->{sort};
    if (defined $args->{after}) {
        my ($i) = grep { defined $m[$_]{ident} && $m[$_]{ident} eq $args->{after} } 0 .. $#m;
        return not_found('after', undef) unless defined $i;
        splice @m, 0, $i + 1;
        return not_found('after', 'No model matches the filter.') unless @m;
    }
    my $more = 0;
    if (defined $args->{limit} && @m > $args->{limit}) {
        splice @m, 0 + $args->{limit};
        $more = 1;
    }
    my $report = defined $args->{limit} || defined $args->{after} ? 1 : 0;
    die "test bug: a page to report is empty\n" if $report && !@m;
    return { status => 200, page => \@m, more => $more, report => $report };
}

# ============================================================================
# The envelope
# ============================================================================

sub set_member {
    my ($members, $key, $value) = @_;
    my ($old) = grep { $_->{key} eq $key } @$members;
    if ($old) {
        %$old = (key => $key, value => $value, set => 1);
    } else {
        push @$members, { key => $key, value => $value, set => 1 };
    }
}

# the members of the answer: provider bytes (raw) or set by the module
sub expect_members {
    my ($L, $e) = @_;
    my @m;
    for my $p (@{ $L->{members} }) {
        if ($p->{key} eq $L->{list_key}) {
            push @m, { %$p, raw => '[' . join(',', map { $_->{raw} } @{ $e->{page} }) . ']',
                       value => [ map { $_->{obj} } @{ $e->{page} } ] };
        } else {
            push @m, { %$p, value => $JSON->decode($p->{raw}) };
        }
    }
    if ($e->{report}) {
        my ($first, $last) = ($e->{page}[0], $e->{page}[-1]);
        if ($L->{list_key} eq 'data') {
            set_member(\@m, has_more => $e->{more} ? JSON::PP::true() : JSON::PP::false());
            set_member(\@m, first_id => $first->{ident_chars});
            set_member(\@m, last_id  => $last->{ident_chars});
        } elsif ($e->{more}) {
            set_member(\@m, nextPageToken => $last->{ident_chars});
        } else {
            @m = grep { $_->{key} ne 'nextPageToken' } @m;
        }
    }
    return \@m;
}

# the bytes of an answer with those members, written compactly: the
# provider's bytes where it sent the member, JSON for those the module sets
sub envelope_text {
    my ($members) = @_;
    return '{' . join(',', map {
        $_->{set} ? $JSON->encode($_->{key}) . ':' . $JSON->encode($_->{value})
                  : "$_->{kraw}:$_->{raw}"
    } @$members) . '}';
}

sub first_difference {
    my ($got, $want) = @_;
    my $i = 0;
    $i++ while $i < length $got && $i < length $want
               && substr($got, $i, 1) eq substr($want, $i, 1);
    my $from = $i > 20 ? $i - 20 : 0;
    return sprintf "differs at byte %d: got '%s', want '%s'", $i,
        substr($got, $from, 60), substr($want, $from, 60);
}

# why the answer's envelope is not the provider's members, in order, with
# their bytes, written compactly; undef when it is
sub envelope_problem {
    my ($content, $want) = @_;
    my $got = eval { raw_members($content) } or return "not a JSON object: $@";
    my @gk = map { my $k = eval { $JSON->decode($_->[0]) }; $k // $_->[0] } @$got;
    my @wk = map { $_->{key} } @$want;
    return "members (@gk), want (@wk)" unless join("\0", @gk) eq join("\0", @wk);
    for my $i (0 .. $#$want) {
        my $w = $want->[$i];
        next if $w->{set};
        return "member $w->{key}: name bytes $got->[$i][0], want $w->{kraw}"
            if $got->[$i][0] ne $w->{kraw};
        return "member $w->{key}: " . first_difference($got->[$i][1], $w->{raw})
            if $got->[$i][1] ne $w->{raw};
    }
    my $compact = '{' . join(',', map { "$_->[0]:$_->[1]" } @$got) . '}';
    return 'not compact: ' . first_difference($content, $compact) if $content ne $compact;
    return undef;
}

sub idents {
    my ($list) = @_;
    return join ' ', map { ref $_ eq 'HASH' ? $_->{id} // $_->{name} // '-' : '?' } @$list;
}

# ============================================================================
# hide/show
# ============================================================================

# the models hide/show keeps: with any show (qr//s), only those whose
# identity matches one (none without identity); then those matching a hide go
sub hide_show {
    my ($models, $show, $hide) = @_;
    return grep {
        my $id = $_->{ident};
        (!@$show || (defined $id && grep { $id =~ $_ } @$show))
            && !(defined $id && grep { $id =~ $_ } @$hide)
    } @$models;
}

# ============================================================================
# Checks of an answer against the expectation
# ============================================================================

sub check_list {
    my ($name, $r, $L, $e) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $want = expect_members($L, $e);
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    my $got = MCTest::json_decode($r->{content});
    my $wanted = { map { $_->{key} => $_->{value} } @$want };
    is_deeply($got, $wanted, "$name: the expected models and members") or do {
        my $list = ref $got eq 'HASH' ? $got->{ $L->{list_key} } : undef;
        diag('got:  ' . (ref $list eq 'ARRAY' ? idents($list) : substr($r->{content}, 0, 300)));
        diag('want: ' . idents($wanted->{ $L->{list_key} }));
    };
    my @missing = grep { index($r->{content}, $_->{raw}) < 0 } @{ $e->{page} };
    ok(!@missing, "$name: each model object's bytes verbatim")
        or diag(scalar(@missing) . ' not found, first: ' . substr($missing[0]{raw}, 0, 200));
    my $why = envelope_problem($r->{content}, $want);
    ok(!defined $why, "$name: the provider's members, in order, compact") or diag($why);
}

sub check_error {
    my ($name, $r, $e) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, $e->{status}, "$name: $e->{status}");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    my $got = MCTest::json_decode($r->{content});
    my $err = ref $got eq 'HASH' && ref $got->{error} eq 'HASH' ? $got->{error} : {};
    my %want = %{ $e->{error} };
    my $msg = delete $want{message};
    is_deeply($got, { error => { %want, message => $msg // $err->{message} } },
              "$name: error {message, type, param, code} as expected")
        or diag($r->{content});
    ok(defined $err->{message} && !ref $err->{message} && length $err->{message},
       "$name: a message");
}

sub check_plain {
    my ($name, $r, $L) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($r->{status}, 200, "$name: 200");
    is($r->{headers}{'content-type'}, 'application/json', "$name: JSON");
    ok($r->{content} eq $L->{text}, "$name: byte-identical to the provider's list")
        or diag(first_difference($r->{content}, $L->{text}));
}

1;
