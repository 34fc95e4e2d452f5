package snapshot

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func FuzzDecodeMeta(f *testing.F) {
	valid, err := encodeMeta(Meta{
		Format: FormatVersion, Key: testKey().normalize(),
		Created: time.Date(2025, 11, 24, 12, 0, 0, 123000, time.UTC),
		RAMSize: 512 << 20, StateSize: 334000,
		RAMSHA256: strings.Repeat("ab", 32), StateSHA256: strings.Repeat("cd", 32),
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add([]byte(strings.Replace(string(valid), `"format": 1`, `"format": 0`, 1)))
	f.Add([]byte(strings.Replace(string(valid), `"format": 1`, `"format": 1, "extra": 1`, 1)))
	f.Add([]byte(strings.Replace(string(valid), `"ram_size": 536870912`, `"ram_size": -1`, 1)))
	f.Add([]byte(strings.Replace(string(valid), `"created": "2025`, `"created": "0000`, 1)))
	f.Add(append(append([]byte{}, valid...), []byte(`{}`)...))
	f.Add([]byte(`{"format":1}`))
	f.Add([]byte(`{"format":"1"}`))
	f.Add([]byte(`{"format":1e400}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	f.Add([]byte("\x00\xff"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := decodeMeta(data)
		if err != nil {
			if !cmp.Equal(m, Meta{}) {
				t.Fatalf("decodeMeta returned %+v with error %v", m, err)
			}
			return
		}
		if m.Format != FormatVersion || m.RAMSize <= 0 || m.StateSize <= 0 || m.Key.check() != nil {
			t.Fatalf("decodeMeta accepted implausible meta %+v", m)
		}
		again, err := encodeMeta(m)
		if err != nil {
			t.Fatalf("encodeMeta(decoded %+v): %v", m, err)
		}
		m2, err := decodeMeta(again)
		if err != nil {
			t.Fatalf("decodeMeta(encodeMeta(m)): %v\n%s", err, again)
		}
		if diff := cmp.Diff(m, m2); diff != "" {
			t.Fatalf("round trip differs (-first +second):\n%s", diff)
		}
	})
}

func TestDecodeMetaSeeds(t *testing.T) {
	valid, err := encodeMeta(Meta{
		Format: FormatVersion, Key: testKey(), Created: time.Now().UTC(),
		RAMSize: 1, StateSize: 1, RAMSHA256: strings.Repeat("0", 64), StateSHA256: strings.Repeat("1", 64),
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, data, wantErr string
	}{
		{"valid", string(valid), ""},
		{"format 0", `{"format":0}`, "format version 0, want 1"},
		{"no format", `{}`, "meta.json: no format version"},
		{"syntax", `{`, "meta.json: unexpected end of JSON input"},
		{"trailing", string(valid) + `{}`, "meta.json: invalid character '{' after top-level value"},
		{"unknown", strings.Replace(string(valid), `"format": 1`, `"format": 1, "x": 2`, 1), `meta.json: json: unknown field "x"`},
		{"bad digest", strings.Replace(string(valid), strings.Repeat("0", 64), "00", 1), `meta.json: bad ram digest "00"`},
		{"empty key", `{"format":1,"created":"2025-01-01T00:00:00Z","ram_size":1,"state_size":1,"ram_sha256":"` + strings.Repeat("0", 64) + `","state_sha256":"` + strings.Repeat("0", 64) + `"}`,
			"meta.json: invalid snapshot key: image digest, kernel, VMM version, accel, memory, vcpus not set"},
	}
	for _, tt := range tests {
		_, err := decodeMeta([]byte(tt.data))
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tt.wantErr {
			t.Errorf("%s: decodeMeta error = %q, want %q", tt.name, got, tt.wantErr)
		}
	}
}
