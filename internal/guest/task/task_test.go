package task

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestDecodeResult(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    *Result
		wantErr string
	}{
		{
			name: "json value",
			in:   `{"id":"1","ok":true,"value":{"enc":"json","data":120},"stdout":"hi\n","stderr":"","timings":{"deserialize_ms":0.3,"call_ms":1,"serialize_ms":0.02}}`,
			want: &Result{ID: "1", OK: true, Value: &Value{Enc: EncJSON, Data: json.RawMessage("120")}, Stdout: "hi\n",
				Timings: Timings{DeserializeMS: 0.3, CallMS: 1, SerializeMS: 0.02}},
		},
		{
			name: "pickle value",
			in:   `{"id":"2","ok":true,"value":{"enc":"pickle","data":"gASVBQAAAAAAAABDAXiULg==","repr":"b'x'"},"stdout":"","stderr":"","timings":{}}`,
			want: &Result{ID: "2", OK: true, Value: &Value{Enc: EncPickle, Data: json.RawMessage(`"gASVBQAAAAAAAABDAXiULg=="`), Repr: "b'x'"}},
		},
		{
			name: "exception",
			in:   `{"id":"3","ok":false,"error":{"type":"ValueError","message":"boom","traceback":"Traceback"},"error_kind":"exception","stdout":"","stderr":"e","stderr_truncated":true,"timings":{},"future_field":1}`,
			want: &Result{ID: "3", Error: &Error{Type: "ValueError", Message: "boom", Traceback: "Traceback"}, ErrorKind: ErrorException, Stderr: "e", StderrTruncated: true},
		},
		{
			name: "bad task without id",
			in:   `{"id":"","ok":false,"error":{"type":"BadTask","message":"m","traceback":""},"error_kind":"bad_task","stdout":"","stderr":"","timings":{}}`,
			want: &Result{Error: &Error{Type: "BadTask", Message: "m"}, ErrorKind: ErrorBadTask},
		},
		{name: "not json", in: `{"id":`, wantErr: "decoding result"},
		{name: "trailing", in: `{"id":"1","ok":true,"value":{"enc":"json","data":1}} {}`, wantErr: "trailing data"},
		{name: "ok without value", in: `{"id":"1","ok":true}`, wantErr: "no value"},
		{name: "ok with error", in: `{"id":"1","ok":true,"value":{"enc":"json","data":1},"error":{"type":"x"}}`, wantErr: "carries an error"},
		{name: "failed without error", in: `{"id":"1","ok":false,"error_kind":"exception"}`, wantErr: "has no error"},
		{name: "failed with value", in: `{"id":"1","ok":false,"value":{"enc":"json","data":1},"error":{},"error_kind":"exception"}`, wantErr: "carries a value"},
		{name: "unknown kind", in: `{"id":"1","ok":false,"error":{},"error_kind":"weird"}`, wantErr: "unknown error kind"},
		{name: "no id", in: `{"ok":true,"value":{"enc":"json","data":1}}`, wantErr: "no id"},
		{name: "bad enc", in: `{"id":"1","ok":true,"value":{"enc":"xml","data":1}}`, wantErr: "unknown value encoding"},
		{name: "pickle not string", in: `{"id":"1","ok":true,"value":{"enc":"pickle","data":1}}`, wantErr: "not a string"},
		{name: "pickle not base64", in: `{"id":"1","ok":true,"value":{"enc":"pickle","data":"!!"}}`, wantErr: "not base64"},
		{name: "json value missing data", in: `{"id":"1","ok":true,"value":{"enc":"json"}}`, wantErr: "no valid json"},
		{name: "negative timing", in: `{"id":"1","ok":true,"value":{"enc":"json","data":1},"timings":{"call_ms":-1}}`, wantErr: "negative timing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeResult([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("DecodeResult(%s) error = %v, want one containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("DecodeResult(%s) error = %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("DecodeResult(%s) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func TestValues(t *testing.T) {
	v, err := JSONValue([]any{5, "x"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(v.Data), `[5,"x"]`; got != want || v.Enc != EncJSON {
		t.Errorf("JSONValue = %s %s, want json %s", v.Enc, got, want)
	}
	var back []any
	if err := v.Decode(&back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]any{5.0, "x"}, back); diff != "" {
		t.Errorf("Decode mismatch (-want +got):\n%s", diff)
	}
	if _, err := v.Pickle(); err == nil {
		t.Errorf("Pickle() of a json value succeeded, want an error")
	}
	if _, err := JSONValue(func() {}); err == nil {
		t.Errorf("JSONValue(func) succeeded, want an error")
	}

	p := PickleValue([]byte{0x80, 4, '.'})
	if string(p.Data) != `"gAQu"` {
		t.Errorf("PickleValue data = %s, want \"gAQu\"", p.Data)
	}
	raw, err := p.Pickle()
	if err != nil || string(raw) != "\x80\x04." {
		t.Errorf("Pickle() = %q, %v, want %q", raw, err, "\x80\x04.")
	}
	if err := p.Decode(&back); err == nil {
		t.Errorf("Decode of a pickle value succeeded, want an error")
	}
}

func TestTaskJSON(t *testing.T) {
	args, _ := JSONValue([]int{5})
	tk := Task{ID: "a", Kind: KindPickle, Pickle: []byte("\x80\x04."), Pickler: "pickle", Args: &args}
	b, err := json.Marshal(tk)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"a","kind":"pickle","pickle":"gAQu","pickler":"pickle","args":{"enc":"json","data":[5]}}`
	if string(b) != want {
		t.Errorf("json.Marshal(task) = %s, want %s", b, want)
	}
	if err := tk.Validate(); err != nil {
		t.Errorf("Validate() = %v, want nil", err)
	}
	bad := []Task{
		{Kind: "nope"},
		{Kind: KindRef},
		{Kind: KindSource},
		{Kind: KindPickle},
		{Kind: KindPickle, Pickle: []byte{1}, Pickler: "marshal"},
		{Kind: KindRef, Ref: "m:f", Args: &Value{Enc: "json", Data: json.RawMessage("{")}},
		{Kind: KindRef, Ref: "m:f", MaxResult: -1},
	}
	for _, b := range bad {
		if err := b.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", b)
		}
	}
	if got, want := (&Task{ID: "x"}).MaxFrame(), uint32(DefaultMaxResult+2*DefaultMaxOutput+FrameSlack+6); got != want {
		t.Errorf("MaxFrame() = %d, want %d", got, want)
	}
}

func FuzzDecodeResult(f *testing.F) {
	for _, s := range []string{
		`{"id":"1","ok":true,"value":{"enc":"json","data":120},"stdout":"","stderr":"","timings":{"deserialize_ms":0.3,"call_ms":1,"serialize_ms":0.02}}`,
		`{"id":"2","ok":true,"value":{"enc":"pickle","data":"gASVBQAAAAAAAABDAXiULg==","repr":"b'x'"},"stdout":"","stderr":"","timings":{}}`,
		`{"id":"3","ok":false,"error":{"type":"ValueError","message":"boom","traceback":"tb"},"error_kind":"exception","stdout":"","stderr":"","timings":{}}`,
		`{"id":"4","ok":false,"error":{"type":"ResultTooLarge","message":"result is 1 bytes","traceback":""},"error_kind":"too_large","stdout":"","stderr":"","timings":{}}`,
		`{"id":"","ok":false,"error":{},"error_kind":"bad_task"}`,
		`{"id":"5","ok":true,"value":{"enc":"json","data":[1, "<a>"]},"timings":{}}`,
		`{}`, `null`, `[]`, `{"ok":true,"value":null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeResult(b)
		if err != nil {
			return
		}
		if r.OK == (r.Value == nil) || r.OK == (r.Error != nil) {
			t.Fatalf("DecodeResult(%q) = %+v: inconsistent ok/value/error", b, r)
		}
		if r.OK {
			if _, err := json.Marshal(r.Value); err != nil {
				t.Fatalf("re-encoding value of %q: %v", b, err)
			}
			if r.Value.Enc == EncPickle {
				if _, err := r.Value.Pickle(); err != nil {
					t.Fatalf("Pickle() of a validated value %q: %v", b, err)
				}
			}
		}
		again, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("re-encoding %q: %v", b, err)
		}
		r2, err := DecodeResult(again)
		if err != nil {
			t.Fatalf("DecodeResult(re-encoded %s) = %v", again, err)
		}
		if diff := cmp.Diff(r, r2, sameJSON); diff != "" {
			t.Fatalf("round trip mismatch (-first +second):\n%s", diff)
		}
	})
}

// sameJSON compares raw JSON by meaning: re-encoding compacts it and escapes HTML.
var sameJSON = cmp.Comparer(func(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return string(a) == string(b)
	}
	return cmp.Equal(x, y)
})
