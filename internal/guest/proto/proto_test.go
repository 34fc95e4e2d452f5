package proto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRoundTrip(t *testing.T) {
	frames := []Frame{
		{Type: Hello, Payload: []byte(`{"who":"init"}`)},
		{Type: Stdout, Payload: []byte{}},
		{Type: Result, Payload: bytes.Repeat([]byte("x"), 70000)},
	}
	var buf bytes.Buffer
	for _, f := range frames {
		if err := Write(&buf, f.Type, f.Payload); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf, 0)
	var got []Frame
	for {
		f, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("Next() error = %v", err)
		}
		got = append(got, f)
	}
	if diff := cmp.Diff(frames, got); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
}

func TestTooLargeKeepsSync(t *testing.T) {
	var buf bytes.Buffer
	_ = Write(&buf, Result, make([]byte, 100))
	_ = Write(&buf, Log, []byte("after"))
	r := NewReader(&buf, 10)
	_, err := r.Next()
	var tl *TooLargeError
	if !errors.As(err, &tl) || tl.Length != 100 || tl.Max != 10 || tl.Type != Result {
		t.Fatalf("Next() error = %v, want TooLargeError{result,100,10}", err)
	}
	f, err := r.Next()
	if err != nil || f.Type != Log || string(f.Payload) != "after" {
		t.Fatalf("Next() after oversized = %v, %v, want log frame \"after\"", f, err)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"bad magic", []byte{'X', 1, 1, 0, 0, 0, 0, 0}, ErrBadMagic},
		{"bad version", []byte{'K', 9, 1, 0, 0, 0, 0, 0}, ErrBadVersion},
		{"short header", []byte{'K', 1, 1}, io.ErrUnexpectedEOF},
		{"short payload", []byte{'K', 1, 1, 0, 0, 0, 0, 5, 'a'}, io.ErrUnexpectedEOF},
		{"empty", nil, io.EOF},
	}
	for _, tt := range tests {
		_, err := NewReader(bytes.NewReader(tt.in), 0).Next()
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: Next(%q) error = %v, want %v", tt.name, tt.in, err, tt.want)
		}
	}
}

func FuzzReader(f *testing.F) {
	var buf bytes.Buffer
	_ = Write(&buf, Hello, []byte(`{"who":"agent"}`))
	_ = Write(&buf, Task, []byte(`{"id":"1"}`))
	f.Add(buf.Bytes())
	f.Add([]byte{'K', 1, 0x12, 0, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{})
	f.Add([]byte("KKKKKKKKKKKK"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), 1<<16)
		var re bytes.Buffer
		for i := 0; i < 1000; i++ {
			fr, err := r.Next()
			if err != nil {
				var tl *TooLargeError
				if errors.As(err, &tl) {
					continue
				}
				return
			}
			if len(fr.Payload) > 1<<16 {
				t.Fatalf("payload of %d bytes over the limit", len(fr.Payload))
			}
			if err := Write(&re, fr.Type, fr.Payload); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestCheckGuestPath(t *testing.T) {
	for _, tt := range []struct {
		path string
		want string // "" = allowed
	}{
		{"/data", ""},
		{"/mnt/in", ""},
		{"/tmp/x", ""},
		{"/home/user/data", ""},
		{"/usr2", ""},
		{"", "empty"},
		{"data", "not absolute"},
		{"/", "root"},
		{"/data/", "not clean"},
		{"//data", "not clean"},
		{"/a/./b", "not clean"},
		{"/a\nb", "newline"},
		{"/usr", "shadow the system directory /usr"},
		{"/usr/local/x", "/usr"},
		{"/lib64", "shadow"},
		{"/proc/x", "shadow"},
		{"/sys", "shadow"},
		{"/dev/shm", "shadow"},
		{"/etc", "shadow"},
		{"/var/data", "shadow"},
		{"/run/x", "shadow"},
		{"/" + strings.Repeat("a", 1100), "longer than"},
	} {
		err := CheckGuestPath(tt.path)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("CheckGuestPath(%q) = %v, want nil", tt.path, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("CheckGuestPath(%q) = %v, want an error containing %q", tt.path, err, tt.want)
		}
	}
	if got, want := VolumeTag(3), "kiln3"; got != want {
		t.Errorf("VolumeTag(3) = %q, want %q", got, want)
	}
}
