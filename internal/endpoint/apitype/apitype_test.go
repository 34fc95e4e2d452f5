package apitype

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
)

// TestSDKErrorCodes holds the Python SDK's copy of the error codes
// (kiln._errors.ERROR_CODES) to ErrorCodes.
func TestSDKErrorCodes(t *testing.T) {
	sdk := filepath.Join(testutil.RepoRoot(t), "python")
	cmd := exec.Command("python3", "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); from kiln import _errors; print(json.dumps(list(_errors.ERROR_CODES)))", sdk)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("importing the SDK from %s: %v", sdk, err)
	}
	var got []string
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(ErrorCodes, got); diff != "" {
		t.Errorf("python/kiln/_errors.py ERROR_CODES differ from apitype.ErrorCodes (-go +python):\n%s", diff)
	}
}

func TestDurationJSON(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Duration
	}{{`"30s"`, Duration(30e9)}, {`1.5`, Duration(1.5e9)}, {`0`, 0}} {
		var d Duration
		if err := json.Unmarshal([]byte(tt.in), &d); err != nil || d != tt.want {
			t.Errorf("Unmarshal(%s) = %v, %v; want %v", tt.in, d, err, tt.want)
		}
	}
	for _, in := range []string{`"soon"`, `true`, `1e300`} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err == nil {
			t.Errorf("Unmarshal(%s) = %v, want an error", in, d)
		}
	}
}
