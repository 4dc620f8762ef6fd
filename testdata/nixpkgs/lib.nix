# A small stand-in for nixpkgs' lib.evalModules (see README.md).
let
  inherit (builtins) isAttrs isFunction isList isPath isString concatMap filter all attrNames listToAttrs foldl' head elem;
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  types = rec {
    str = "str"; bool = "bool"; int = "int"; package = "package"; attrs = "attrs"; path = "path";
    enum = _: "enum"; nullOr = _: "nullOr"; listOf = _: "listOf"; attrsOf = _: "attrsOf";
  };

  # defs: [ { conds = [ bool ]; value = ...; } ] for one attribute path.
  mergeDefs = path: defs:
    let
      expand = d:
        let v = d.value; t = if isAttrs v then v._type or null else null; in
        if t == "if" then expand { conds = d.conds ++ [ v.condition ]; value = v.content; }
        else if t == "merge" then concatMap (c: expand { inherit (d) conds; value = c; }) v.contents
        else [ d ];
      ds = concatMap expand defs;
      isSet = d: isAttrs d.value && !(d.value ? _type) && (d.value.type or null) != "derivation";
      active = filter (d: all (c: c) d.conds) ds;
      prio = d: if isAttrs d.value && (d.value._type or null) == "override" then d.value.priority else 100;
      unwrap = d: if isAttrs d.value && (d.value._type or null) == "override" then d.value.content else d.value;
      best = foldl' (m: d: if prio d < m then prio d else m) 100000 active;
      chosen = filter (d: prio d == best) active;
      names = unique (concatMap (d: attrNames d.value) ds);
    in
    if ds != [ ] && all isSet ds then
      listToAttrs (map (n: {
        name = n;
        value = mergeDefs (path ++ [ n ]) (concatMap (d: if d.value ? ${n} then [{ inherit (d) conds; value = d.value.${n}; }] else [ ]) ds);
      }) names)
    else if chosen == [ ] then
      throw "fake lib: ${builtins.concatStringsSep "." path} has no (active) definition"
    else if isList (unwrap (head chosen)) then
      concatMap unwrap chosen
    else
      unwrap (foldl' (a: b: b) null chosen);

  # evalModules { modules; specialArgs } -> { config; }
  evalModules = { modules, specialArgs ? { } }:
    let
      lib = import ./lib.nix;
      args = specialArgs // { inherit config lib; options = { }; modulesPath = toString ../nixos/modules; };
      load = m:
        let
          m1 = if isPath m || isString m then import m else m;
          m2 = if isFunction m1 then m1 (args // { pkgs = args.pkgs or { }; }) else m1;
          isStructured = m2 ? options || m2 ? config;
          own = {
            options = m2.options or { };
            config = if isStructured then m2.config or { } else removeAttrs m2 [ "imports" ];
          };
        in
        [ own ] ++ concatMap load (m2.imports or [ ]);
      all' = concatMap load modules;
      # Option defaults as definitions of low priority.
      optDefs = o:
        if (o._type or null) == "option" then (if o ? default then mkOverride 1500 o.default else mkMerge [ ])
        else builtins.mapAttrs (n: optDefs) o;
      defs = map (m: { conds = [ ]; value = m.config; }) all'
        ++ map (m: { conds = [ ]; value = optDefs m.options; }) all';
      config = mergeDefs [ ] defs;
    in
    { inherit config; };
}
