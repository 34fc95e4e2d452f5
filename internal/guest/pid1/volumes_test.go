package pid1

import (
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

func TestCheckVolumes(t *testing.T) {
	vol := func(tag, path string) proto.Volume { return proto.Volume{Tag: tag, Path: path, ReadOnly: true} }
	for _, tt := range []struct {
		name string
		vols []proto.Volume
		want string // "" = valid
	}{
		{"none", nil, ""},
		{"two", []proto.Volume{vol("kiln0", "/data"), vol("kiln3", "/out")}, ""},
		{"unknown tag", []proto.Volume{vol("kiln9", "/data")}, `unknown or repeated slot tag "kiln9"`},
		{"repeated tag", []proto.Volume{vol("kiln0", "/a"), vol("kiln0", "/b")}, "repeated slot tag"},
		{"system path", []proto.Volume{vol("kiln0", "/usr/share")}, "would shadow"},
		{"nested", []proto.Volume{vol("kiln0", "/data/x"), vol("kiln1", "/data")}, "one is inside the other"},
		{"too many", []proto.Volume{vol("kiln0", "/a"), vol("kiln1", "/b"), vol("kiln2", "/c"), vol("kiln3", "/d"), vol("kiln4", "/e")}, "at most 4"},
	} {
		err := checkVolumes(tt.vols)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("checkVolumes(%s) = %v, want nil", tt.name, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("checkVolumes(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}

// FuzzDecodeMount: whatever the host sends in a Mount frame, what init
// accepts has known, distinct slot tags and allowed guest paths.
func FuzzDecodeMount(f *testing.F) {
	for _, s := range []string{
		`{"volumes":[{"tag":"kiln0","path":"/data","ro":true},{"tag":"kiln1","path":"/tmp/out"}]}`,
		`{"volumes":[]}`, `{}`, `{"volumes":[{"tag":"kiln0","path":"/usr"}]}`, `{"volumes":[{"tag":"kiln0","path":"/a"},{"tag":"kiln0","path":"/b"}]}`,
		`{"volumes":[{"tag":"kiln7","path":"/data"}]}`, `{"volumes":[{"tag":"kiln0","path":"data/../x"}]}`, `null`, ``, `[`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		vols, err := decodeMount(b)
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, v := range vols {
			if seen[v.Tag] {
				t.Errorf("decodeMount(%q) accepted tag %s twice", b, v.Tag)
			}
			seen[v.Tag] = true
			if err := proto.CheckGuestPath(v.Path); err != nil {
				t.Errorf("decodeMount(%q) accepted guest path %q: %v", b, v.Path, err)
			}
		}
		if len(vols) > proto.VolumeSlots {
			t.Errorf("decodeMount(%q) accepted %d volumes, more than %d slots", b, len(vols), proto.VolumeSlots)
		}
	})
}
