package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/guest/task"
)

// taskFlags say which function to call and with what arguments; kiln
// invoke and kiln submit share them.
type taskFlags struct {
	function, file, ref, args, kwargs string
}

func (tf *taskFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&tf.file, "file", "", "a Python file whose source is sent; --function names the function in it (default: the only one it defines)")
	f.StringVar(&tf.function, "function", "", "with --file: the function to call; without: MOD:FN, as --ref")
	f.StringVar(&tf.ref, "ref", "", "MOD:FN importable inside the image, e.g. math:factorial")
	f.StringVar(&tf.args, "args", "[]", "positional arguments as a JSON list")
	f.StringVar(&tf.kwargs, "kwargs", "{}", "keyword arguments as a JSON object")
}

// task returns the task the flags describe.
func (tf *taskFlags) task() (*task.Task, error) {
	fn := tf.function
	if tf.ref != "" {
		if tf.file != "" {
			return nil, errors.New("--ref and --file exclude each other: call a function of the image (--ref) or send one (--file)")
		}
		fn = tf.ref
	}
	return makeTask(fn, tf.file, tf.args, tf.kwargs)
}

// makeTask builds a task: by source when file is given (fn names the
// function in it), else by reference (fn is MOD:FN).
func makeTask(fn, file, args, kwargs string) (*task.Task, error) {
	t := &task.Task{}
	switch {
	case file != "":
		src, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("reading --file: %w", err)
		}
		t.Kind, t.Source, t.Name = task.KindSource, string(src), fn
		t.Filename = file // tracebacks name the user's file and line
	case fn != "":
		if !strings.Contains(fn, ":") {
			return nil, fmt.Errorf("--function %q: want MOD:FN (e.g. math:factorial), or --file FILE --function FN", fn)
		}
		t.Kind, t.Ref = task.KindRef, fn
	default:
		return nil, errors.New("nothing to call: give --ref MOD:FN, or --file handler.py [--function FN]")
	}
	var err error
	if t.Args, err = jsonValue("--args", args, '['); err != nil {
		return nil, err
	}
	if t.Kwargs, err = jsonValue("--kwargs", kwargs, '{'); err != nil {
		return nil, err
	}
	return t, nil
}

// jsonValue checks that s is a JSON list (want '[') or object ('{') and
// passes it through as raw JSON, so big integers stay exact.
func jsonValue(flag, s string, want byte) (*task.Value, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	if !json.Valid([]byte(s)) || s[0] != want {
		kind := map[byte]string{'[': "list", '{': "object"}[want]
		return nil, fmt.Errorf("%s must be a JSON %s, e.g. %s", flag, kind, map[byte]string{'[': `'[1, "a"]'`, '{': `'{"k": 1}'`}[want])
	}
	return &task.Value{Enc: task.EncJSON, Data: json.RawMessage(s)}, nil
}
