package size

import "testing"

func TestParse(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"512M", 512 << 20},
		{"512m", 512 << 20},
		{"512Mi", 512 << 20},
		{"512MiB", 512 << 20},
		{"512 MB", 512 << 20},
		{"1G", 1 << 30},
		{"2gi", 2 << 30},
		{"64k", 64 << 10},
		{"1Ki", 1024},
		{"1T", 1 << 40},
		{"536870912", 536870912},
		{"100b", 100},
		{" 1G ", 1 << 30},
		{"0", 0},
	}
	for _, tt := range tests {
		got, err := Parse(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("Parse(%q) = %d, %v, want %d, nil", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "M", "-1M", "1.5G", "1X", "1MM", "99999999999999999999", "9999999999999G", "0x10"} {
		if got, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) = %d, nil, want error", bad, got)
		}
	}
}

func TestFormat(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {63565824, "60.6 MiB"}, {3 << 30, "3.0 GiB"}}
	for _, tt := range tests {
		if got := Format(tt.n); got != tt.want {
			t.Errorf("Format(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"512M", "1G", "0", "99999999999999999999", " 2 gib ", "1X"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err == nil && n < 0 {
			t.Fatalf("Parse(%q) = %d: negative", s, n)
		}
	})
}
