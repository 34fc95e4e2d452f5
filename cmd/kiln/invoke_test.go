package main

import (
	"strings"
	"testing"
)

func TestMakeTask(t *testing.T) {
	tests := []struct {
		name                       string
		fn, file, args, kwargs     string
		wantKind, wantArgs, wantKw string
		wantErr                    string
	}{
		{name: "ref", fn: "math:factorial", args: "[5]", kwargs: "{}", wantKind: "ref", wantArgs: "[5]", wantKw: "{}"},
		{name: "big ints stay exact", fn: "m:f", args: "[1180591620717411303424]", kwargs: "{}", wantKind: "ref", wantArgs: "[1180591620717411303424]", wantKw: "{}"},
		{name: "no function", args: "[]", kwargs: "{}", wantErr: "nothing to call"},
		{name: "not mod:fn", fn: "factorial", args: "[]", kwargs: "{}", wantErr: "MOD:FN"},
		{name: "args not a list", fn: "m:f", args: `{"a": 1}`, kwargs: "{}", wantErr: "--args must be a JSON list"},
		{name: "bad kwargs", fn: "m:f", args: "[]", kwargs: "[1]", wantErr: "--kwargs must be a JSON object"},
		{name: "missing file", fn: "f", file: "/no/such/file.py", args: "[]", kwargs: "{}", wantErr: "reading --file"},
	}
	for _, tt := range tests {
		got, err := makeTask(tt.fn, tt.file, tt.args, tt.kwargs)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: makeTask() error = %v, want %q", tt.name, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: makeTask() error = %v", tt.name, err)
			continue
		}
		if got.Kind != tt.wantKind || string(got.Args.Data) != tt.wantArgs || string(got.Kwargs.Data) != tt.wantKw {
			t.Errorf("%s: makeTask() = kind %q args %s kwargs %s, want %q %s %s", tt.name, got.Kind, got.Args.Data, got.Kwargs.Data, tt.wantKind, tt.wantArgs, tt.wantKw)
		}
	}
}
