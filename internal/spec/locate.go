package spec

import (
	"github.com/pelletier/go-toml/v2/unstable"
)

// locations maps keys of a document to the line that defines them: the
// top-level key alone, and top-level key + first sub key (for tables like
// files and env).
type locations map[[2]string]int

// locate records where keys are defined. It stops silently at a syntax error
// (the decoder reports those) and never fails.
func locate(data []byte) locations {
	loc := locations{}
	var p unstable.Parser
	p.Reset(data)
	var table []string
	record := func(full []string, line int) {
		if len(full) == 0 {
			return
		}
		if _, ok := loc[[2]string{full[0], ""}]; !ok {
			loc[[2]string{full[0], ""}] = line
		}
		if len(full) > 1 {
			if _, ok := loc[[2]string{full[0], full[1]}]; !ok {
				loc[[2]string{full[0], full[1]}] = line
			}
		}
	}
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			table = keyParts(e)
			if len(table) > 0 {
				record(table, line(&p, e))
			}
		case unstable.KeyValue:
			full := append(append([]string(nil), table...), keyParts(e)...)
			record(full, line(&p, e))
			if v := e.Value(); len(full) == 1 && v.Kind == unstable.InlineTable {
				it := v.Children()
				for it.Next() {
					kv := it.Node()
					if kv.Kind == unstable.KeyValue {
						sub := keyParts(kv)
						if len(sub) > 0 {
							record([]string{full[0], sub[0]}, line(&p, kv))
						}
					}
				}
			}
		}
	}
	return loc
}

func keyParts(n *unstable.Node) []string {
	var parts []string
	it := n.Key()
	for it.Next() {
		parts = append(parts, string(it.Node().Data))
	}
	return parts
}

// line returns the line of the first key node of n.
func line(p *unstable.Parser, n *unstable.Node) int {
	it := n.Key()
	if it.Next() {
		if r := it.Node().Raw; r.Length > 0 {
			return p.Shape(r).Start.Line
		}
	}
	return 0
}

// at builds an *Error for key (and optional sub key), locating its line.
func (l locations) at(file, key, sub, msg string) *Error {
	ln := l[[2]string{key, sub}]
	if ln == 0 {
		ln = l[[2]string{key, ""}]
	}
	return &Error{File: file, Line: ln, Key: key, Msg: msg}
}
