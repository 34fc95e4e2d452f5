package sandbox

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/guest/task"
)

// TestEncodeTasks: runs of tasks that may share a batch go as one Tasks
// frame (when the agent takes them), everything else as Task frames, in
// the order given.
func TestEncodeTasks(t *testing.T) {
	src := func(id, key string) *task.Task {
		return &task.Task{ID: id, Kind: task.KindSource, Source: "def f():\n    return 1\n", CacheKey: key}
	}
	run := &task.Task{ID: "r", Kind: task.KindRun, Argv: []string{"true"}, CacheKey: "k"}
	for _, c := range []struct {
		name  string
		ts    []*task.Task
		batch bool
		want  []string // per frame: "task:ID" or "tasks:ID,ID"
	}{
		{"one", []*task.Task{src("a", "k")}, true, []string{"task:a"}},
		{"a run", []*task.Task{src("a", "k"), src("b", "k"), src("c", "k")}, true, []string{"tasks:a,b,c"}},
		{"old agent", []*task.Task{src("a", "k"), src("b", "k")}, false, []string{"task:a", "task:b"}},
		{"keys change", []*task.Task{src("a", "k"), src("b", "k"), src("c", "j"), src("d", "k")}, true, []string{"tasks:a,b", "task:c", "task:d"}},
		{"no key", []*task.Task{src("a", ""), src("b", "")}, true, []string{"task:a", "task:b"}},
		{"run kind", []*task.Task{run, run}, true, []string{"task:r", "task:r"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			if n := encodeTasks(&buf, c.ts, c.batch); n != len(c.ts) {
				t.Fatalf("encodeTasks = %d, want %d", n, len(c.ts))
			}
			r := proto.NewReader(&buf, proto.DefaultMax)
			var got []string
			for buf.Len() > 0 {
				f, err := r.Next()
				if err != nil {
					t.Fatal(err)
				}
				switch f.Type {
				case proto.Task:
					var tk task.Task
					if err := json.Unmarshal(f.Payload, &tk); err != nil {
						t.Fatal(err)
					}
					got = append(got, "task:"+tk.ID)
				case proto.Tasks:
					var b task.Batch
					if err := json.Unmarshal(f.Payload, &b); err != nil {
						t.Fatal(err)
					}
					if b.Task.ID != "" || b.Task.Source == "" {
						t.Errorf("batch task = %+v, want the shared fields without an ID", b.Task)
					}
					s := "tasks:"
					for i, it := range b.Items {
						if i > 0 {
							s += ","
						}
						s += it.ID
					}
					got = append(got, s)
				default:
					t.Fatalf("frame type %v", f.Type)
				}
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("encodeTasks frames (-want +got):\n%s", diff)
			}
		})
	}
}
