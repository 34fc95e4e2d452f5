package build

import (
	"strings"
	"testing"
)

func TestCheckHost(t *testing.T) {
	tests := []struct {
		goos, goarch string
		ok           bool
	}{
		{"linux", "amd64", true},
		{"linux", "arm64", false},
		{"darwin", "amd64", false},
		{"windows", "amd64", false},
	}
	for _, tt := range tests {
		err := CheckHost(tt.goos, tt.goarch)
		if (err == nil) != tt.ok {
			t.Errorf("CheckHost(%s, %s) = %v, want ok %v", tt.goos, tt.goarch, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "x86_64") {
			t.Errorf("CheckHost(%s, %s) = %q, want it to say what to use instead", tt.goos, tt.goarch, err)
		}
	}
}

func TestSize(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {63565824, "60.6 MiB"}, {3 << 30, "3.0 GiB"}}
	for _, tt := range tests {
		if got := Size(tt.n); got != tt.want {
			t.Errorf("Size(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestDroppable(t *testing.T) {
	tests := []struct {
		p    string
		want bool
	}{
		{"/s/usr/lib/python3/dist-packages/torch/bin/test_jit", true},
		{"/s/opt/python/lib/python3.11/site-packages/pkg/helper", true},
		{"/s/usr/lib/python3/dist-packages/torch/lib/libtorch.so", false},
		{"/s/usr/lib/python3/dist-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so", false},
		{"/s/usr/lib/x86_64-linux-gnu/libfoo.so.1", false},
		{"/s/usr/bin/python3.11", false},
		{"/elsewhere/usr/lib/python3/dist-packages/x/prog", false},
	}
	for _, tt := range tests {
		if got := droppable("/s", tt.p); got != tt.want {
			t.Errorf("droppable(/s, %s) = %v, want %v", tt.p, got, tt.want)
		}
	}
}
