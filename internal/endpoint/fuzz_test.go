package endpoint

import (
	"bytes"
	"encoding/json"
	"testing"
)

var decoderSeeds = []string{
	`{"function_id":"fn-1","args":{"enc":"json","data":[1,2]},"kwargs":{"enc":"json","data":{"a":1}}}`,
	`{"function_id":"fn-1","args":{"enc":"pickle","data":"gASVBQAAAAAAAACMAWGULg=="}}`,
	`{"function_id":"fn-1","tasks":[{},{"args":{"enc":"json","data":[]}}]}`,
	`{"image":"numpy","source":"def f(x):\n    return x\n","function":"f","timeout":"30s","memory_mib":512,"max_retries":2}`,
	`{"image":"numpy","pickle":"gAQu","pickler":"cloudpickle","timeout":12.5}`,
	`{"image":"numpy","ref":"math:factorial"}`,
	`{"task_ids":["t-1","t-2"],"timeout":"5s"}`,
	`{"task_ids":["t-1"],"running":true,"known_running":["t-1"]}`,
	`{"task_group":"tg-1","cursor":17,"timeout":30}`,
	`{"task_group":"tg-1","task_ids":["t-1"]}`, `{"task_group":"tg-1","cursor":-1}`,
	`{"function_id":"fn-1","task_group":"tg-1","args":{"enc":"json","data":[1]}}`,
	`{"tasks":[{"function_id":"fn-1"}],"task_group":"tg-2"}`,
	`{"image":"numpy","source":"def f():
    return np.pi
","function":"f","module":"__main__","filename":"/home/u/a.py","lineno":12,` +
		`"namespace":[{"name":"np","import":"numpy"},{"name":"K","value":{"enc":"json","data":3}},{"name":"g","source":"def g():
    return 1
","lineno":3}],"exact_types":true}`,
	`{"image":"numpy","command":"echo {x} | wc -c","walltime":2.5}`,
	`{"image":"numpy","kind":"shell","command":"true","walltime":-1}`,
	`{"image":"numpy","source":"def f():
    return 1
","ref":"math:factorial"}`,
	`{"image":"numpy","ref":"math:factorial","namespace":[{"name":"x","import":"os"}]}`,
	`{"function_id":`, `[]`, `null`, `{"x":1}`, `{"function_id":"a"} trailing`, "",
	`{"args":{"enc":"json","data":{}}}`, `{"timeout":-1}`, `{"timeout":1e300}`,
}

func seed(f *testing.F) {
	for _, s := range decoderSeeds {
		f.Add([]byte(s))
	}
}

func FuzzDecodeSubmit(f *testing.F) {
	seed(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeSubmit(bytes.NewReader(b))
		if err != nil {
			return
		}
		if req.FunctionID == "" {
			t.Errorf("DecodeSubmit(%q) accepted a request without function_id", b)
		}
		if err := checkSubmit(req); err != nil {
			t.Errorf("DecodeSubmit(%q) accepted a request that fails check: %v", b, err)
		}
		// A decoded request re-encodes and decodes to the same thing.
		again, _ := json.Marshal(req)
		if _, err := DecodeSubmit(bytes.NewReader(again)); err != nil {
			t.Errorf("re-decoding %s: %v", again, err)
		}
	})
}

func FuzzDecodeBatch(f *testing.F) {
	seed(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeBatch(bytes.NewReader(b), 100)
		if err != nil {
			return
		}
		if len(req.Tasks) == 0 || len(req.Tasks) > 100 {
			t.Errorf("DecodeBatch(%q) accepted %d tasks", b, len(req.Tasks))
		}
		for _, tk := range req.Tasks {
			if tk.FunctionID == "" {
				t.Errorf("DecodeBatch(%q) accepted a task without function", b)
			}
		}
	})
}

func FuzzDecodeRegister(f *testing.F) {
	seed(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeRegister(bytes.NewReader(b))
		if err != nil {
			return
		}
		if req.Image == "" || req.Kind == "" || req.Timeout < 0 || req.MemoryMiB < 0 || req.MaxRetries < 0 || req.Walltime < 0 {
			t.Errorf("DecodeRegister(%q) accepted %+v", b, req)
		}
		given := 0
		for _, set := range []bool{req.Source != "", len(req.Pickle) > 0, req.Ref != "", req.Command != ""} {
			if set {
				given++
			}
		}
		if given != 1 {
			t.Errorf("DecodeRegister(%q) accepted %d of source, pickle, ref and command, want exactly 1", b, given)
		}
	})
}

func FuzzDecodeWait(f *testing.F) {
	seed(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeWait(bytes.NewReader(b), 100)
		if err != nil {
			return
		}
		if (len(req.TaskIDs) == 0) == (req.TaskGroup == "") || req.Timeout < 0 || req.Cursor < 0 {
			t.Errorf("DecodeWait(%q) accepted %+v", b, req)
		}
	})
}
