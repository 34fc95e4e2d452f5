// Package agent embeds the Python guest agent that runs tasks inside the VM.
package agent

import _ "embed"

// Source is the text of agent.py, installed in images at proto.AgentPath.
//
//go:embed agent.py
var Source []byte
