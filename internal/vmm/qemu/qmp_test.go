package qemu

import (
	"bufio"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestDecodeQMP(t *testing.T) {
	for _, tc := range []struct {
		line   string
		kind   qmpKind
		errSub string
	}{
		{`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}` + "\r\n", kindGreeting, ""},
		{`{"return": {}, "id": 1}`, kindReturn, ""},
		{`{"return": [], "id": 18446744073709551615}`, kindReturn, ""},
		{`{"return": {"status": "running", "running": true}}`, kindReturn, ""},
		{`{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`, kindError, ""},
		{`{"timestamp": {"seconds": 1764000000, "microseconds": 5}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}`, kindEvent, ""},
		{`{"event": "STOP"}`, kindEvent, ""},
		{``, 0, "not a JSON object"},
		{`[1]`, 0, "not a JSON object"},
		{`{"return": {}`, 0, "decoding message"},
		{`{}`, 0, "has 0 of"},
		{`{"return": 1, "event": "X"}`, 0, "has 2 of"},
		{`{"return": {}, "id": "abc"}`, 0, "bad message id"},
		{`{"return": {}, "id": -1}`, 0, "bad message id"},
		{`{"error": {}, "id": 1}`, 0, "without class"},
		{`{"error": "boom", "id": 1}`, 0, "decoding error"},
		{`{"event": 7}`, 0, "decoding message"},
	} {
		m, err := decodeQMP([]byte(tc.line))
		switch {
		case tc.errSub == "" && err != nil:
			t.Errorf("decodeQMP(%q) = %v, want kind %d", tc.line, err, tc.kind)
		case tc.errSub != "" && (err == nil || !strings.Contains(err.Error(), tc.errSub)):
			t.Errorf("decodeQMP(%q) = %v, want an error containing %q", tc.line, err, tc.errSub)
		case err == nil && m.kind() != tc.kind:
			t.Errorf("decodeQMP(%q).kind() = %d, want %d", tc.line, m.kind(), tc.kind)
		}
	}
}

func FuzzDecodeQMP(f *testing.F) {
	for _, s := range []string{
		`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}`,
		`{"return": {}, "id": 1}`,
		`{"id": 3, "error": {"class": "GenericError", "desc": "x"}}`,
		`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}`,
		`{"return": [{"status": "completed"}], "id": 99}`,
		`{"return": 1, "event": "X"}`,
		`{"error": null, "return": null}`,
		"{\"return\": \"\\u0000\"}\r\n",
		`{`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		m, err := decodeQMP(line)
		if err != nil {
			return
		}
		k := m.kind()
		if k < kindGreeting || k > kindEvent {
			t.Fatalf("decodeQMP(%q) kind %d out of range", line, k)
		}
		if k == kindError && (m.err == nil || m.err.Error() == "") {
			t.Fatalf("decodeQMP(%q): error answer without error", line)
		}
		if k == kindEvent && m.Event == "" {
			t.Fatalf("decodeQMP(%q): event without name", line)
		}
		if (k == kindReturn || k == kindError) && m.ID != nil {
			if _, err := parseID(m.ID); err != nil {
				t.Fatalf("decodeQMP(%q) accepted a bad id: %v", line, err)
			}
		}
	})
}

func TestReadLine(t *testing.T) {
	for _, tc := range []struct {
		in     string
		max    int
		want   []string
		errSub string
	}{
		{"a\nbb\n", 10, []string{"a\n", "bb\n"}, "EOF"},
		{"a\nbb", 10, []string{"a\n"}, "unexpected EOF"},
		{strings.Repeat("x", 40) + "\n", 100, []string{strings.Repeat("x", 40) + "\n"}, "EOF"},
		{strings.Repeat("x", 40) + "\n", 20, nil, "longer than 20"},
	} {
		r := bufio.NewReaderSize(strings.NewReader(tc.in), 16)
		var got []string
		var err error
		for {
			var l []byte
			l, err = readLine(r, tc.max)
			if err != nil {
				break
			}
			got = append(got, string(l))
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("readLine(%q) lines (-want +got):\n%s", tc.in, diff)
		}
		if !strings.Contains(err.Error(), tc.errSub) {
			t.Errorf("readLine(%q) final error = %v, want %q", tc.in, err, tc.errSub)
		}
	}
}
